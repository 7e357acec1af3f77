"""Input-pipeline speed: time to the first batch against the number of shards, and samples/s per pipeline.

    python benchmarks/data_pipeline.py                       # everything (S3 = a loopback moto server it starts)
    python benchmarks/data_pipeline.py --only startup --shards 1 100 10000
    python benchmarks/data_pipeline.py --only throughput --workers 1 2 4 --no_s3 --no_train_step

Prints JSON lines.

* ``startup``: tiny text shards (8 samples each) listed in one manifest; seconds from ``build_train_iterator`` to
  the first batch, for the streaming reader (``data.streaming = True``: reads the manifest, then the first few
  shards) and the random-access reader (indexes every shard's tar headers first; from S3 it downloads every
  shard, so it is measured up to ``--random_access_s3_max`` shards). Goal: streaming flat in the shard count and
  under 5 s at 10,000.
* ``throughput``: streaming samples/s of the ``text`` (pre-tokenized, seq 256), ``image_caption`` (224 x 224 jpg
  + caption) and ``robotics`` (4 cameras x 2 frames of 224 x 224 jpg, lowdim npz, instructions; the original's
  LBM layout) pipelines with ``data.num_workers`` threads decoding, from local disk and from S3, batch 8, after a
  warm-up batch (the robotics stats.json is read locally: only the shards come from S3). ``train_step_s`` is the
  matching model's train step on this machine, per 8 samples (transformer_11m 8 x 256, vlm_11m 4 x 512, the tiny
  vit-backbone diffusion_policy over 8 images, batch 8); ``data_keeps_up``: a batch arrives faster than a step.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSOR = os.path.join(ROOT, "tiny_data", "vlm_processor")
BATCH = 8
CAMS = ("scene_left", "scene_right", "wrist_left", "wrist_right")
PROP, ACT = "robot__actual__poses__left::panda__xyz", "robot__desired__poses__left::panda__xyz"


# ---------------------------------------------------------------- datasets


def _jpg(rng: np.random.Generator, size: int = 224) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    base = (np.stack([x, y, x + y], -1) * rng.uniform(0.3, 1.0, 3)) % 256
    noise = rng.integers(0, 32, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def text_dataset(root: str, num_shards: int, per_shard: int, seq_len: int = 256) -> str:
    from vla_foundry_jax.data import write_shards

    rng = np.random.default_rng(0)
    samples = [
        {
            "__key__": f"{i:08d}",
            "json.gz": gzip.compress(json.dumps(rng.integers(0, 50000, seq_len + 1).tolist()).encode(), mtime=0),
        }
        for i in range(num_shards * per_shard)
    ]
    return write_shards(root, samples, samples_per_shard=per_shard)


def image_caption_dataset(root: str, num_shards: int, per_shard: int) -> str:
    from vla_foundry_jax.data import write_shards

    rng = np.random.default_rng(1)
    samples = [
        {"__key__": f"{i:08d}", "jpg": _jpg(rng), "txt": b"a photo of a red square on a blue background"}
        for i in range(num_shards * per_shard)
    ]
    return write_shards(root, samples, samples_per_shard=per_shard)


def robotics_dataset(root: str, num_shards: int, per_shard: int) -> str:
    """Samples in the original's LBM layout: 4 cameras x frames t-1, t0 (jpg), a 1 + 1 + 15 step lowdim window."""
    import yaml

    from vla_foundry_jax.data import write_shards
    from vla_foundry_jax.data.shards import npz_bytes

    rng = np.random.default_rng(2)
    steps = 17
    samples = []
    for i in range(num_shards * per_shard):
        s = {"__key__": f"{i:08x}-0000-0000-0000-000000000000"}
        for t in (-1, 0):
            for cam in CAMS:
                s[f"{cam}_t{t}.jpg"] = _jpg(rng)
        past, future = np.zeros(steps, bool), np.zeros(steps, bool)
        past[0], future[2:] = True, True
        lowdim = {PROP: rng.normal(size=(steps, 3)), ACT: rng.normal(size=(steps, 3))}
        s["lowdim.npz"] = npz_bytes({**lowdim, "past_mask": past, "future_mask": future})
        meta = {"episode_id": f"e{i // 50}", "anchor_relative_idx": 1, "camera_names": list(CAMS)}
        s["metadata.json"] = json.dumps(meta).encode()
        s["language_instructions.json"] = json.dumps({"original": ["pick up the cup"]}).encode()
        samples.append(s)
    manifest = write_shards(root, samples, samples_per_shard=per_shard)
    config = {"camera_names": list(CAMS), "image_indices": [-1, 0], "past_lowdim_steps": 1, "future_lowdim_steps": 15}
    with open(os.path.join(root, "preprocessing_config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    stats = {k: {"mean": [0.0] * 3, "std": [1.0] * 3, "count": [100] * steps} for k in (PROP, ACT)}
    with open(os.path.join(root, "stats.json"), "w") as f:
        json.dump(stats, f)
    return manifest


def data_params(kind: str, manifest: str, workers: int, *, streaming: bool = True, local_dir: str | None = None):
    """``local_dir``: where the robotics stats.json is read from (the shards may be on S3)."""
    from vla_foundry_jax.params import ImageCaptionDataParams, RoboticsDataParams, TextDataParams

    common = dict(
        dataset_manifest=[manifest],
        streaming=streaming,
        num_workers=workers,
        allow_multiple_epochs=True,
        shuffle_buffer_size=64,
        shuffle_initial=16,
    )
    if kind == "text":
        return TextDataParams(seq_len=256, **common)
    if kind == "image_caption":
        return ImageCaptionDataParams(processor=PROCESSOR, image_size=224, img_num_tokens=16, seq_len=64, **common)
    stats = [os.path.join(local_dir, "stats.json") if local_dir else paths_join(manifest, "stats.json")]
    return RoboticsDataParams(
        camera_names=list(CAMS),
        image_indices=[-1, 0],
        processor=PROCESSOR,
        image_size=224,
        img_num_tokens=1,
        max_text_seq_len=16,
        dataset_statistics=stats,
        action_fields=[ACT],
        proprioception_fields=[PROP],
        lowdim_past_timesteps=1,
        lowdim_future_timesteps=14,
        **common,
    )


def paths_join(manifest: str, name: str) -> str:
    from vla_foundry_jax import paths

    return paths.join(paths.dirname(manifest), name)


# ---------------------------------------------------------------- S3 (a loopback moto server in its own process)


class LoopbackS3:
    def __init__(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_REGION="us-east-1",
        )
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="bench-data")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        self.client = boto3.client("s3")

    def upload(self, local_dir: str, prefix: str) -> str:
        names = sorted(os.listdir(local_dir))

        def put(name: str) -> None:
            with open(os.path.join(local_dir, name), "rb") as f:
                self.client.put_object(Bucket="bench-data", Key=f"{prefix}/{name}", Body=f.read())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, names))
        return f"s3://bench-data/{prefix}/manifest.jsonl"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# ---------------------------------------------------------------- measurements


def first_batch_s(data, *, batch: int = BATCH) -> float:
    from vla_foundry_jax.data import build_train_iterator

    t0 = time.perf_counter()
    it = build_train_iterator(data, global_batch_size=batch, num_batches=1000)
    next(it)
    elapsed = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return elapsed


def samples_per_s(data, batches: int) -> float:
    from vla_foundry_jax.data import build_train_iterator

    it = build_train_iterator(data, global_batch_size=BATCH, num_batches=batches + 1)
    next(it)  # warm-up: first shards read, buffer filled, threads started
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return BATCH * batches / elapsed


def train_step_s(kind: str) -> float:
    """Median train-step seconds of the model that eats this pipeline's batches, per 8 samples."""
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vla_foundry_jax.params import TransformerParams, ViTParams, VLMParams

    from common import build_step, time_step

    rng = np.random.default_rng(0)
    if kind == "text":
        params, batch = TransformerParams(hidden_dim=96, n_layers=8, n_heads=4), 8
        ids = rng.integers(0, 50000, (batch, 257))
        b = {"input_ids": jnp.asarray(ids, jnp.int32), "loss_mask": jnp.ones((batch, 257), bool)}
    elif kind == "image_caption":
        vit = ViTParams(img_size=224, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=4)
        lm = TransformerParams(hidden_dim=96, n_layers=8, n_heads=4, vocab_size=50432)
        params, batch = VLMParams(vit=vit, transformer=lm, image_token_id=50431), 4
        ids = rng.integers(0, 50000, (batch, 513)).astype(np.int32)
        ids[:, :256] = params.image_token_id
        b = {
            "input_ids": jnp.asarray(ids),
            "loss_mask": jnp.asarray(ids != params.image_token_id),
            "pixel_values": jnp.asarray(rng.normal(size=(batch, 1, 224, 224, 3)).astype(np.float32)),
        }
    else:
        from policy import make_batch, policy_params

        params, batch = policy_params(), 8  # 8 images x 256 tokens: a longer denoiser sequence
        params = params.replace(transformer=params.transformer.replace(max_seq_len=4096))
        b = {k: jnp.asarray(v) for k, v in make_batch(batch, len(CAMS) * 2, 0).items()}
    state, step = build_step(params, batch=batch)
    return time_step(state, step, [b], 3)["step_s_median"] * BATCH / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["startup", "throughput"], default=None)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 100, 10000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pipelines", nargs="+", default=["text", "image_caption", "robotics"])
    ap.add_argument("--random_access_s3_max", type=int, default=100)
    ap.add_argument("--no_s3", action="store_true")
    ap.add_argument("--no_train_step", action="store_true")
    args = ap.parse_args()

    import logging

    logging.getLogger().setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    os.environ["VLA_FOUNDRY_CACHE"] = os.path.join(tmp, "cache")  # no local copies from an earlier run
    s3 = None if args.no_s3 else LoopbackS3()
    out = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
    if s3 is not None:  # the S3 client's one-time set-up, not part of any reader's start-up
        from vla_foundry_jax import paths

        t0 = time.perf_counter()
        paths.exists("s3://bench-data/none")
        out(bench="s3_client_setup", seconds=round(time.perf_counter() - t0, 3))
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup below (stops the moto server)
    try:
        if args.only in (None, "startup"):
            for n in args.shards:
                manifest = text_dataset(os.path.join(tmp, f"startup{n}"), n, BATCH, seq_len=16)
                sources = [("local", manifest)]
                if s3 is not None:
                    sources.append(("s3", s3.upload(os.path.dirname(manifest), f"startup{n}")))
                for where, m in sources:
                    for streaming in (True, False):
                        if where == "s3" and not streaming and n > args.random_access_s3_max:
                            continue
                        data = data_params("text", m, 1, streaming=streaming)
                        data = data.replace(seq_len=16, shuffle_initial=BATCH)  # the first batch needs ~1 shard
                        out(
                            bench="startup",
                            shards=n,
                            source=where,
                            reader="streaming" if streaming else "random_access",
                            first_batch_s=round(first_batch_s(data), 3),
                        )
        if args.only in (None, "throughput"):
            sizes = {"text": (16, 256, 60), "image_caption": (8, 32, 12), "robotics": (8, 8, 4)}
            makers = {"text": text_dataset, "image_caption": image_caption_dataset, "robotics": robotics_dataset}
            for kind in args.pipelines:
                shards, per_shard, batches = sizes[kind]
                manifest = makers[kind](os.path.join(tmp, kind), shards, per_shard)
                sources = [("local", manifest)]
                if s3 is not None:
                    sources.append(("s3", s3.upload(os.path.dirname(manifest), kind)))
                step = None if args.no_train_step else train_step_s(kind)
                for where, m in sources:
                    for w in args.workers:
                        data = data_params(kind, m, w, local_dir=os.path.dirname(manifest))
                        rate = samples_per_s(data, batches)
                        row = dict(bench="throughput", pipeline=kind, source=where, num_workers=w)
                        row["samples_per_s"] = round(rate, 1)
                        row["batch_s"] = round(BATCH / rate, 4)
                        if step is not None:
                            row["train_step_s"] = round(step, 4)
                            row["data_keeps_up"] = BATCH / rate < step
                        out(**row)
    finally:
        if s3 is not None:
            s3.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
