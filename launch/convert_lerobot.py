"""LeRobot dataset -> robotics shards: ``python -m launch.convert_lerobot --source=DIR_OR_REPO --output_dir=OUT``.

``--source``: a LeRobot v2.x / v3.0 dataset directory, a URL (s3://, gs://, hf://) or a hub id. Writes ``OUT/train`` and
``OUT/val`` (manifest.jsonl, shards, stats.json, preprocessing_config.yaml, processing_metadata.json) in the
original's robotics layout; rerun the same command to resume a killed conversion. Options and output:
``vla_foundry_jax/apps/lerobot_convert.py``. Bad input prints one line ``error: ...`` and exits with status 2.
The last line printed is a JSON summary (manifests, counts, frames per second).
"""

from __future__ import annotations

import json

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.lerobot_convert import ConvertOptions, convert_lerobot

flags.DEFINE_string("source", None, "LeRobot dataset: local directory, s3:// / gs:// / hf:// URL or hub id org/name.")
flags.DEFINE_string("output_dir", None, "Output directory (train/ and val/ are written in it).")
flags.DEFINE_list("cameras", None, "Cameras to keep (default: every video / image feature).")
flags.DEFINE_list("action_fields", None, "Low-dim fields forming the action (default: action).")
flags.DEFINE_list("proprioception_fields", None, "Proprioception fields (default: observation.state).")
flags.DEFINE_list("extra_fields", [], "Other numeric fields to store in lowdim.npz.")
flags.DEFINE_float("fps", None, "Resample episodes to this frame rate (default: the dataset's).")
flags.DEFINE_integer("past_lowdim_steps", 1, "Past rows of each low-dim window.")
flags.DEFINE_integer("future_lowdim_steps", 14, "Future rows of each low-dim window.")
flags.DEFINE_list("image_indices", ["-1", "0"], "Image frame offsets from the anchor.")
flags.DEFINE_integer("stride", 1, "One sample every `stride` frames.")
flags.DEFINE_integer("max_padding_left", 1, "Drop anchors needing more padded past rows.")
flags.DEFINE_integer("max_padding_right", 7, "Drop anchors needing more padded future rows.")
flags.DEFINE_enum("padding_strategy", "copy", ["copy", "zero"], "Rows outside the episode: edge copies or zeros.")
flags.DEFINE_bool("filter_still_samples", False, "Drop windows where the action / proprioception fields are still.")
flags.DEFINE_float("still_threshold", 0.01, "Max per-feature std of a still window.")
flags.DEFINE_list("relative_actions", [], "ACTION:STATE[:DIMS] -> field ACTION_relative = action - state at anchor.")
flags.DEFINE_float("val_fraction", 0.1, "Fraction of episodes in val/ (seeded split).")
flags.DEFINE_integer("split_seed", 0, "Seed of the train / val split.")
flags.DEFINE_integer("samples_per_shard", 128, "About this many samples per shard (whole episodes).")
flags.DEFINE_list("resize_images_size", None, "H,W to resize images to (default: keep).")
flags.DEFINE_enum("image_resizing_method", "center_crop", ["center_crop", "resize"], "How to resize.")
flags.DEFINE_enum("image_format", "jpg", ["jpg", "png"], "Image encoding in the shards.")
flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality.")
flags.DEFINE_integer("max_episodes", -1, "Convert at most this many episodes (-1: all).")
flags.DEFINE_list("skip_episodes", [], "Episode indices to leave out.")
flags.DEFINE_bool("compute_statistics", True, "Write stats.json per split.")
flags.DEFINE_string("revision", None, "Hub revision of a hub dataset id.")
flags.DEFINE_string("cache_dir", None, "Cache directory for hub / fsspec sources.")
flags.DEFINE_integer("num_workers", 1, "Processes converting shards in parallel.")
flags.DEFINE_bool("overwrite", False, "Start again over a conversion with other options.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["source", "output_dir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = FLAGS
    options = ConvertOptions(
        source=f.source,
        output_dir=f.output_dir,
        cameras=tuple(f.cameras) if f.cameras is not None else None,
        action_fields=tuple(f.action_fields) if f.action_fields is not None else None,
        proprioception_fields=tuple(f.proprioception_fields) if f.proprioception_fields is not None else None,
        extra_fields=tuple(f.extra_fields),
        fps=f.fps,
        past_lowdim_steps=f.past_lowdim_steps,
        future_lowdim_steps=f.future_lowdim_steps,
        image_indices=tuple(int(i) for i in f.image_indices),
        stride=f.stride,
        max_padding_left=f.max_padding_left,
        max_padding_right=f.max_padding_right,
        padding_strategy=f.padding_strategy,
        filter_still_samples=f.filter_still_samples,
        still_threshold=f.still_threshold,
        relative_actions=tuple(f.relative_actions),
        val_fraction=f.val_fraction,
        split_seed=f.split_seed,
        samples_per_shard=f.samples_per_shard,
        resize_images_size=tuple(int(x) for x in f.resize_images_size) if f.resize_images_size else None,
        image_resizing_method=f.image_resizing_method,
        image_format=f.image_format,
        jpeg_quality=f.jpeg_quality,
        max_episodes=f.max_episodes,
        skip_episodes=tuple(int(e) for e in f.skip_episodes),
        compute_statistics=f.compute_statistics,
        revision=f.revision,
        cache_dir=f.cache_dir,
        num_workers=f.num_workers,
        overwrite=f.overwrite,
        progress=f.progress,
    )
    result = convert_lerobot(options)
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
