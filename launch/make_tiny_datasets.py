"""Generate the bundled tiny datasets: ``python -m launch.make_tiny_datasets --out_dir=tiny_data``.

Writes ``<out_dir>/tokenizer`` (word-level HF tokenizer), ``<out_dir>/text_untokenized`` and
``<out_dir>/text`` (manifest.jsonl + tar shards), and for VLMs ``<out_dir>/shapes/{train,val}`` (image_caption
shards of coloured shapes) and ``<out_dir>/vlm_processor`` (HF processor directory). Deterministic: rerunning
gives identical bytes.
"""

from __future__ import annotations

import argparse
import os

from vla_foundry_jax.data.tiny_datasets import make_tiny_datasets, make_tiny_vlm_datasets


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
    args = parser.parse_args(argv)
    paths = make_tiny_datasets(
        args.out_dir, seq_len=args.seq_len, num_docs=args.num_docs, num_shards=args.num_shards, seed=args.seed
    )
    if not args.skip_vlm:
        paths |= make_tiny_vlm_datasets(
            args.out_dir, num_train=args.num_train_images, num_val=args.num_val_images, seed=args.seed
        )
    for name, path in paths.items():
        print(f"{name}: {path}")
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.out_dir) for f in files)
    print(f"total size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
