"""Generate the bundled tiny datasets: ``python -m launch.make_tiny_datasets --out_dir=tiny_data``.

Writes ``<out_dir>/tokenizer`` (word-level HF tokenizer), ``<out_dir>/text_untokenized`` and
``<out_dir>/text`` (manifest.jsonl + tar shards), and for VLMs ``<out_dir>/shapes/{train,val}`` (image_caption
shards of coloured shapes), ``<out_dir>/vlm_processor`` (HF processor directory) and, for stable diffusion,
``<out_dir>/tiny_clip`` (a tiny HF CLIP checkpoint + CLIP-style word-level tokenizer; building it needs torch),
and for VLA policies ``<out_dir>/reach/{train,val}`` (the tiny reach task in the original's robotics layout, with
stats.json and preprocessing_config.yaml; ``--only_robotics`` writes just these).
Deterministic: rerunning gives identical bytes. See :mod:`vla_foundry_jax.testbeds`.
"""

from __future__ import annotations

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.testbeds.tiny_data import make_tiny_data, tree_size

flags.DEFINE_string("out_dir", "tiny_data", "Output directory.")
flags.DEFINE_integer("seq_len", 128, "Text samples hold seq_len + 1 ids.")
flags.DEFINE_integer("num_docs", 512, "Documents in text_untokenized.")
flags.DEFINE_integer("num_shards", 4, "Shards of the text datasets.")
flags.DEFINE_integer("seed", 0, "Seed of every generator.")
flags.DEFINE_integer("num_train_images", 1024, "image_caption samples in shapes/train.")
flags.DEFINE_integer("num_val_images", 192, "image_caption samples in shapes/val.")
flags.DEFINE_bool("skip_vlm", False, "Only write the text data and tokenizer (and reach/ unless skipped).")
flags.DEFINE_bool("skip_robotics", False, "Do not write reach/ (robotics).")
flags.DEFINE_bool("only_robotics", False, "Write reach/ (robotics) only.")
flags.DEFINE_integer("reach_train_samples", 544, "Robotics samples in reach/train.")
flags.DEFINE_integer("reach_val_samples", 64, "Robotics samples in reach/val.")
flags.DEFINE_integer("reach_samples_per_episode", 1, "Anchor timesteps per episode.")
flags.DEFINE_integer("reach_distractors", 0, "Distractor discs of other colours.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths = make_tiny_data(
        FLAGS.out_dir,
        seq_len=FLAGS.seq_len,
        num_docs=FLAGS.num_docs,
        num_shards=FLAGS.num_shards,
        seed=FLAGS.seed,
        num_train_images=FLAGS.num_train_images,
        num_val_images=FLAGS.num_val_images,
        skip_vlm=FLAGS.skip_vlm,
        skip_robotics=FLAGS.skip_robotics,
        only_robotics=FLAGS.only_robotics,
        reach_train_samples=FLAGS.reach_train_samples,
        reach_val_samples=FLAGS.reach_val_samples,
        reach_samples_per_episode=FLAGS.reach_samples_per_episode,
        reach_distractors=FLAGS.reach_distractors,
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"total size: {tree_size(FLAGS.out_dir) / 1e6:.2f} MB")


if __name__ == "__main__":
    cli.run(main)
