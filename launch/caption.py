"""Caption image files with a trained VLM: ``python -m launch.caption --run_dir=DIR img1.png [img2.jpg ...]``.

See :func:`vla_foundry_jax.apps.captioning.caption_run`.
"""

from __future__ import annotations

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.captioning import caption_run

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a trained VLM.", required=True)
flags.DEFINE_integer("max_new_tokens", 16, "Longest caption in tokens.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    for path, caption in caption_run(FLAGS.run_dir, paths, max_new_tokens=FLAGS.max_new_tokens):
        print(f"{path}\t{caption}")


if __name__ == "__main__":
    cli.run(main)
