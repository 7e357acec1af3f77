"""Frames per second of ``launch.convert_lerobot`` per core, on a LeRobot dataset written here.

    python benchmarks/lerobot_convert.py                         # v3.0, 16 episodes x 100 frames, 2 cameras 224x224
    python benchmarks/lerobot_convert.py --version v2.1 --size 96 --workers 1,2,4

The dataset (``testbeds.tiny_lerobot``: smooth synthetic images, H.264 yuv420p at 10 fps, ``observation.state`` /
``action`` of 3 features) is written once into a temporary directory; each ``--workers`` setting then converts it
from scratch (the project's defaults: past 1 / future 14, images at t-1 and t, JPEG q95, stats at the end). A
"frame" is one source time step (all cameras): ``frames_per_s`` = frames / wall time of the whole conversion
(decode, encode, shards, statistics), ``frames_per_s_per_core`` = that / workers.

Prints one JSON line per setting and a last summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from vla_foundry_jax.apps.lerobot_convert import ConvertOptions, convert_lerobot
from vla_foundry_jax.testbeds.tiny_lerobot import write_tiny_lerobot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="v3.0", choices=["v2.1", "v3.0"])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--length", type=int, default=100, help="frames per episode")
    parser.add_argument("--size", type=int, default=224, help="camera images are size x size")
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    parser.add_argument("--resize", type=int, default=0, help="resize images to this square size (0: keep)")
    args = parser.parse_args()
    cameras = [f"observation.images.cam{i}" for i in range(args.cameras)]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        t0 = time.perf_counter()
        write_tiny_lerobot(
            src,
            version=args.version,
            lengths=[args.length] * args.episodes,
            cameras=cameras,
            size=args.size,
            episodes_per_file=4,
        )
        write_s = time.perf_counter() - t0
        results = []
        for workers in [int(w) for w in args.workers.split(",")]:
            out = os.path.join(tmp, f"out{workers}")
            t0 = time.perf_counter()
            result = convert_lerobot(
                ConvertOptions(
                    source=src,
                    output_dir=out,
                    num_workers=workers,
                    progress=False,
                    resize_images_size=(args.resize, args.resize) if args.resize else None,
                )
            )
            wall = time.perf_counter() - t0
            frames = result["num_frames"]
            row = {
                "version": args.version,
                "workers": workers,
                "frames": frames,
                "images": frames * args.cameras,
                "image_size": args.size,
                "samples": sum(s["num_samples"] for s in result["splits"].values()),
                "wall_s": round(wall, 2),
                "frames_per_s": round(frames / wall, 1),
                "frames_per_s_per_core": round(frames / wall / workers, 1),
                "shards": result["shards_converted"],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "dataset_write_s": round(write_s, 2),
                "cpu_count": os.cpu_count(),
                "best_frames_per_s": max(r["frames_per_s"] for r in results),
                "frames_per_s_per_core_1_worker": next((r["frames_per_s"] for r in results if r["workers"] == 1), None),
            }
        )
    )


if __name__ == "__main__":
    main()
