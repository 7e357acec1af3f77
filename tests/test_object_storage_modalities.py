"""Image-caption and robotics datasets that live entirely in an S3 bucket (moto on loopback) train.

Each bundled dataset (shards, manifest, the robotics stats.json / preprocessing_config.yaml /
processing_metadata.json, and the processor directory) is uploaded to the bucket; a 3-step streaming run through
``train_from_gin`` (what ``launch.train`` calls) reads everything from there and writes its output to the bucket.
Its losses equal those of the same run over the local copy, and the run loads from the bucket with
``sampling.load_run_model`` holding the local run's weights. Kill / resume on S3 is covered by the text test in
tests/test_object_storage_runs.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.fixtures.paths import TINY
from vla_foundry_jax import paths

STEPS, BATCH = 3, 4


def _common(prefix: str, data: str, out: str) -> list[str]:
    return [
        f"{prefix}.streaming = True",
        f"{prefix}.shuffle_buffer_size = 16",
        f"{prefix}.shuffle_initial = 8",
        f"{prefix}.val_dataset_manifest = []",
        f"{prefix}.processor = '{data}/vlm_processor'",
        f"experiment.output_dir = '{out}'",
        f"experiment.total_train_samples = {STEPS * BATCH}",
        "experiment.num_checkpoints = 1",
        "experiment.log_every_n_steps = 1",
        "experiment.async_checkpointing = False",
        f"hparams.global_batch_size = {BATCH}",
        f"hparams.per_gpu_batch_size = {BATCH}",
        "hparams.warmup = '1'",
    ]


def robotics_bindings(data: str, out: str) -> tuple[str, list[str]]:
    """The VLA quickstart shrunk to 3 steps, reading the reach dataset under ``data`` (local dir or bucket URL)."""
    return "vla_quickstart.gin", [
        *_common("robotics", data, out),
        f"robotics.dataset_manifest = ['{data}/reach/train/manifest.jsonl']",
        f"robotics.dataset_statistics = ['{data}/reach/train/stats.json']",
    ]


def image_caption_bindings(data: str, out: str) -> tuple[str, list[str]]:
    """The VLM quickstart shrunk to 3 steps, reading the shapes dataset under ``data``."""
    return "vlm_quickstart.gin", [
        *_common("image_caption", data, out),
        f"image_caption.dataset_manifest = ['{data}/shapes/train/manifest.jsonl']",
    ]


MODALITIES = {"robotics": robotics_bindings, "image_caption": image_caption_bindings}


def _losses(text: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def _flat_params(model) -> dict[str, np.ndarray]:
    from flax import nnx

    from vla_foundry_jax.checkpoint import flat_params

    return {k: np.asarray(v) for k, v in flat_params(nnx.state(model, nnx.Param)).items()}


@pytest.mark.parametrize("modality", sorted(MODALITIES))
def test_dataset_in_the_bucket_trains_like_the_local_copy(modality, s3, tmp_path, monkeypatch):
    from vla_foundry_jax.apps.gin_train import train_from_gin
    from vla_foundry_jax.sampling import load_run_model

    monkeypatch.setenv("VLA_FOUNDRY_CACHE", str(tmp_path / "cache"))
    bucket = s3.bucket()
    data = f"{bucket}/data"
    uploaded = ["vlm_processor", "reach/train" if modality == "robotics" else "shapes/train"]
    for rel in uploaded:
        paths.upload_tree(os.path.join(TINY, rel), f"{data}/{rel}")

    gin_file, local_bindings = MODALITIES[modality](TINY, str(tmp_path / "local"))
    train_from_gin([gin_file], local_bindings)
    gin_file, s3_bindings = MODALITIES[modality](data, f"{bucket}/run")
    train_from_gin([gin_file], s3_bindings)

    with open(tmp_path / "local" / "metrics.jsonl") as f:
        want = _losses(f.read())
    got = _losses(paths.read_text(f"{bucket}/run/metrics.jsonl"))
    assert sorted(want) == list(range(1, STEPS + 1))
    assert got == want
    assert not os.path.exists("s3:") and not os.path.exists(os.path.join(TINY, "s3:"))  # nothing written locally

    model, exp, _ = load_run_model(f"{bucket}/run")
    assert exp.output_dir == f"{bucket}/run" and exp.data.dataset_manifest[0].startswith(data)
    local_model, _, _ = load_run_model(str(tmp_path / "local"))
    got_w, want_w = _flat_params(model), _flat_params(local_model)
    assert set(got_w) == set(want_w)
    for name in want_w:
        np.testing.assert_array_equal(got_w[name], want_w[name], err_msg=name)


def test_stats_of_a_dataset_in_the_bucket_are_computed_and_merged_there(s3, tmp_path):
    import shutil

    from vla_foundry_jax.data.stats import compute_stats, merge_dataset_stats

    data = f"{s3.bucket()}/reach"
    paths.upload_tree(os.path.join(TINY, "reach", "train"), data)
    local = str(tmp_path / "reach")
    shutil.copytree(os.path.join(TINY, "reach", "train"), local)
    want = compute_stats(os.path.join(local, "manifest.jsonl"))  # written beside the manifest
    got = compute_stats(f"{data}/manifest.jsonl")
    assert got == want
    assert json.loads(paths.read_text(f"{data}/stats.json")) == want
    assert paths.exists(f"{data}/stats_sketch.npz")

    # Merging: the sketches and preprocessing_config.yaml are read from the bucket and the result written there.
    merged = merge_dataset_stats([f"{data}/stats.json"] * 2, output=f"{data}/merged/stats.json")
    assert merged == merge_dataset_stats([os.path.join(local, "stats.json")] * 2)
    assert all("approximate" not in e["percentile_error"]["method"] for e in merged.values())  # sketches read
    assert json.loads(paths.read_text(f"{data}/merged/stats.json")) == merged
    with open(os.path.join(local, "preprocessing_config.yaml")) as f:
        assert paths.read_text(f"{data}/merged/preprocessing_config.yaml") == f.read()
