"""Caption image files with a trained VLM: ``python -m launch.caption --run_dir=DIR img1.png [img2.jpg ...]``."""

from __future__ import annotations

from absl import app, flags

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a trained VLM.", required=True)
flags.DEFINE_integer("max_new_tokens", 16, "Longest caption in tokens.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    from vla_foundry_jax.captioning import Captioner
    from vla_foundry_jax.sampling import load_model

    model, exp = load_model(FLAGS.run_dir)
    for path, caption in zip(
        paths, Captioner(model, exp, max_new_tokens=FLAGS.max_new_tokens).caption_files(paths), strict=True
    ):
        print(f"{path}\t{caption}")


if __name__ == "__main__":
    app.run(main)
