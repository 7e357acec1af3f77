"""Runs whose ``experiment.output_dir`` is on object storage, against real servers on loopback.

S3 (moto): ``launch.train`` streaming its data and tokenizer from the bucket is killed with SIGKILL after its first
committed checkpoint, a half-uploaded newer step is left in the bucket (what a kill mid-upload leaves), and the rerun
of the same command, through a proxy failing 5% of the requests with 500, resumes from S3 and logs the losses of an
uninterrupted run over the local copy of the data; ``launch.generate`` and ``load_run_model`` read the run from S3.
GCS (gcp-storage-emulator): config.gin, params.json, metrics.jsonl, TensorBoard events and Orbax checkpoints are
written to the bucket; a damaged newest step is moved aside in the bucket and the older one restores from GCS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.fixtures.object_store import subprocess_env
from tests.fixtures.paths import ROOT, TINY
from tests.fixtures.runs import logged_losses, tiny_experiment, tiny_train_command
from vla_foundry_jax import paths

STEPS = 24  # checkpoints every 6 steps (num_checkpoints=4)
BINDINGS = ["experiment.num_checkpoints = 4", "text_untokenized.streaming = True"]


def _upload(local_dir: str, url: str) -> None:
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            paths.write_bytes(paths.join(url, name), f.read())


def _remote_losses(out: str) -> dict[int, float]:
    out_losses = {}
    for line in paths.read_text(paths.join(out, "metrics.jsonl")).splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out_losses[rec["step"]] = rec["loss"]
    return out_losses


def _committed(out: str) -> list[int]:
    ckpt = paths.join(out, "checkpoints")
    if not paths.exists(ckpt):
        return []
    return sorted(int(n[: -len(".committed")]) for n in paths.listdir(ckpt) if n.endswith(".committed"))


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    env = subprocess_env({"VLA_FOUNDRY_CACHE": str(tmp_path_factory.mktemp("cache"))})
    res = subprocess.run(
        tiny_train_command(out, STEPS, BINDINGS), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return logged_losses(out)


def test_s3_run_killed_resumes_from_the_bucket_and_matches(straight_losses, s3, tmp_path):
    bucket = s3.bucket()
    out = f"{bucket}/runs/tiny"
    _upload(os.path.join(TINY, "text_untokenized"), f"{bucket}/data/text")  # the data and tokenizer on S3 too
    _upload(os.path.join(TINY, "tokenizer"), f"{bucket}/data/tokenizer")
    env = subprocess_env(s3.env, {"VLA_FOUNDRY_CACHE": str(tmp_path / "cache")})
    cmd = tiny_train_command(
        out,
        STEPS,
        [
            *BINDINGS,
            f"text_untokenized.dataset_manifest = ['{bucket}/data/text/manifest.jsonl']",
            f"text_untokenized.tokenizer = '{bucket}/data/tokenizer'",
        ],
    )
    with open(tmp_path / "first.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while not _committed(out):
        assert proc.poll() is None, (tmp_path / "first.txt").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint committed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    kept = _committed(out)
    assert kept and kept[-1] < STEPS, f"the run finished before the kill ({kept})"
    # A kill mid-upload: part of a newer step's files are in the bucket, its marker is not.
    last = paths.join(out, "checkpoints", str(kept[-1]))
    fs, inner = paths.filesystem(last)
    files = sorted(fs.find(inner))
    for f in files[: len(files) // 2]:
        paths.write_bytes(f"s3://{f}".replace(f"/{kept[-1]}/", f"/{kept[-1] + 6}/", 1), b"partial")
    # The local staging copy is gone (a new machine): the rerun reads everything back from the bucket, through a
    # proxy that answers 500 to 5% of the requests.
    proxy = s3.faults(0.05, "500")
    env = subprocess_env(s3.env, {"VLA_FOUNDRY_CACHE": str(tmp_path / "cache2")})
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert proxy.failed > 0 and "transient error on s3://" in done.stderr
    assert f"resuming from {out}/checkpoints/{kept[-1]}" in done.stderr
    got = _remote_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == straight_losses[s] for s in got), [(s, got[s], straight_losses[s]) for s in got]
    assert _committed(out)[-1] == STEPS
    names = paths.listdir(out)
    assert {"config.gin", "params.json", "metrics.jsonl", "tensorboard", "checkpoints"} <= set(names), names
    assert any(n.startswith("events.out.tfevents") for n in paths.listdir(paths.join(out, "tensorboard")))
    assert not os.path.exists(os.path.join(ROOT, "s3:")), "a local folder named after the URL was written"

    gen = subprocess.run(
        [sys.executable, "-m", "launch.generate", f"--run_dir={out}", "--prompt=the", "--max_new_tokens=4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.strip()

    from vla_foundry_jax.sampling import load_run_model

    _model, exp, _ = load_run_model(out)
    assert exp.output_dir == out and exp.model.hidden_dim == 32


def test_bad_output_dirs_fail_before_training(s3, tmp_path, monkeypatch):
    from vla_foundry_jax.training.loop import train

    monkeypatch.setenv("VLA_FOUNDRY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(paths.PathError, match=r"experiment.output_dir.*no-such-bucket-9z.*bucket does not exist"):
        train(tiny_experiment("s3://no-such-bucket-9z/run"))
    with pytest.raises(paths.PathError, match=r"experiment.output_dir 'hf://org/repo': hf:// is read-only"):
        train(tiny_experiment("hf://org/repo"))


def test_gcs_run_writes_everything_to_the_bucket_and_resumes_from_it(gcs, monkeypatch, tmp_path):
    from vla_foundry_jax.sampling import load_run_model
    from vla_foundry_jax.training.loop import train

    monkeypatch.setenv("VLA_FOUNDRY_CACHE", str(tmp_path / "cache"))
    out = f"{gcs.bucket()}/runs/tiny"
    exp = tiny_experiment(out, steps=4)
    first = train(exp, gin_config="# the run's gin\n")
    assert sorted(paths.listdir(paths.join(out, "checkpoints")))[:2] == ["2", "4"]
    assert paths.read_text(paths.join(out, "config.gin")) == "# the run's gin\n"
    assert json.loads(paths.read_text(paths.join(out, "params.json")))["output_dir"] == out
    losses = _remote_losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert any(n.startswith("events.out.tfevents") for n in paths.listdir(paths.join(out, "tensorboard")))

    # A damaged newest step on GCS: the restore falls back to step 2 and moves step 4 aside in the bucket.
    from flax import nnx

    from vla_foundry_jax.checkpoint import RunCheckpointer, flat_params

    step4 = paths.join(out, "checkpoints", "4")
    fs, inner = paths.filesystem(step4)
    for f in fs.find(f"{inner}/model"):
        if paths.size(f"gs://{f}") > 64:
            paths.write_bytes(f"gs://{f}", b"\0" * paths.size(f"gs://{f}"))
    checkpointer = RunCheckpointer(out, async_save=False)
    step, restored, data_state = checkpointer.restore_newest(first.state)
    checkpointer.close()
    assert step == 2 and int(restored["step"]) == 2 and data_state is not None
    assert paths.listdir(paths.join(out, "checkpoints_corrupt")) == ["4"]
    model, stored, _ = load_run_model(out)  # step 2 now: the newest that restores
    assert stored.output_dir == out
    got, want = flat_params(nnx.state(model, nnx.Param)), flat_params(restored["params"])
    assert set(want) <= set(got)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
