"""Generate the bundled tiny datasets: ``python -m launch.make_tiny_datasets --out_dir=tiny_data``.

Writes ``<out_dir>/tokenizer`` (word-level HF tokenizer), ``<out_dir>/text_untokenized`` and
``<out_dir>/text`` (manifest.jsonl + tar shards), and for VLMs ``<out_dir>/shapes/{train,val}`` (image_caption
shards of coloured shapes), ``<out_dir>/vlm_processor`` (HF processor directory) and, for stable diffusion,
``<out_dir>/tiny_clip`` (a tiny HF CLIP checkpoint + CLIP-style word-level tokenizer; building it needs torch),
and for VLA policies ``<out_dir>/reach/{train,val}`` (the tiny reach task in the original's robotics layout, with
stats.json and preprocessing_config.yaml; ``--only_robotics`` writes just these).
Deterministic: rerunning gives identical bytes.
"""

from __future__ import annotations

import argparse
import os

from vla_foundry_jax.data.tiny_datasets import build_tiny_clip, make_tiny_datasets, make_tiny_vlm_datasets
from vla_foundry_jax.data.tiny_robotics import make_tiny_robotics_datasets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="tiny_data", help="output directory")
    parser.add_argument("--seq_len", type=int, default=128, help="text samples hold seq_len + 1 ids")
    parser.add_argument("--num_docs", type=int, default=512, help="documents in text_untokenized")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_images", type=int, default=1024, help="image_caption samples in shapes/train")
    parser.add_argument("--num_val_images", type=int, default=192, help="image_caption samples in shapes/val")
    parser.add_argument("--skip_vlm", action="store_true", help="only write the text data and tokenizer")
    parser.add_argument("--skip_robotics", action="store_true", help="do not write reach/ (robotics)")
    parser.add_argument("--only_robotics", action="store_true", help="write reach/ (robotics) only")
    parser.add_argument("--reach_train_samples", type=int, default=544, help="robotics samples in reach/train")
    parser.add_argument("--reach_val_samples", type=int, default=64, help="robotics samples in reach/val")
    parser.add_argument("--reach_samples_per_episode", type=int, default=1, help="anchor timesteps per episode")
    parser.add_argument("--reach_distractors", type=int, default=0, help="distractor discs of other colours")
    args = parser.parse_args(argv)
    paths: dict[str, str] = {}
    if not args.only_robotics:
        paths |= make_tiny_datasets(
            args.out_dir, seq_len=args.seq_len, num_docs=args.num_docs, num_shards=args.num_shards, seed=args.seed
        )
    if not args.skip_robotics:
        paths |= make_tiny_robotics_datasets(
            args.out_dir,
            num_train=args.reach_train_samples,
            num_val=args.reach_val_samples,
            samples_per_episode=args.reach_samples_per_episode,
            num_distractors=args.reach_distractors,
            seed=args.seed,
        )
    if not args.skip_vlm and not args.only_robotics:
        paths |= make_tiny_vlm_datasets(
            args.out_dir, num_train=args.num_train_images, num_val=args.num_val_images, seed=args.seed
        )
        paths["tiny_clip"] = build_tiny_clip(os.path.join(args.out_dir, "tiny_clip"), seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.out_dir) for f in files)
    print(f"total size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
