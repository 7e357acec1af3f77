"""A LeRobot conversion killed with SIGKILL mid-way resumes without redoing its finished shards."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

from vla_foundry_jax.apps.lerobot_convert import COMPLETE_FILE, ConvertOptions, convert_lerobot
from vla_foundry_jax.testbeds.tiny_lerobot import write_tiny_lerobot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigkilled_conversion_resumes_and_matches_an_uninterrupted_one(tmp_path):
    src = str(tmp_path / "src")
    write_tiny_lerobot(src, version="v3.0", lengths=[40] * 24, size=48, episodes_per_file=6)
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    flags = ["--samples_per_shard=30", "--future_lowdim_steps=7", "--val_fraction=0.25"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "launch.convert_lerobot", f"--source={src}", f"--output_dir={out}", *flags]
    proc = subprocess.Popen([*cmd, "--progress=false"], cwd=REPO, env=env, stderr=subprocess.PIPE)
    records = []
    deadline = time.time() + 120
    while len(records) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
        records = glob.glob(os.path.join(out, "*", "shard-*.json"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not os.path.exists(os.path.join(out, COMPLETE_FILE))
    assert not glob.glob(os.path.join(out, "*", "manifest.jsonl"))  # a partial output is not a dataset
    records = glob.glob(os.path.join(out, "*", "shard-*.json"))
    finished = {p: os.stat(p[: -len(".json")] + ".tar").st_mtime_ns for p in records}
    opts = dict(future_lowdim_steps=7, val_fraction=0.25, samples_per_shard=30, progress=False)
    resumed = convert_lerobot(ConvertOptions(source=src, output_dir=out, **opts))
    assert resumed["shards_reused"] == len(finished) >= 3
    assert resumed["shards_converted"] > 0
    for record, mtime in finished.items():
        assert os.stat(record[: -len(".json")] + ".tar").st_mtime_ns == mtime  # not redone
    full = convert_lerobot(ConvertOptions(source=src, output_dir=ref, **opts))
    assert full["shards_converted"] == resumed["shards_converted"] + resumed["shards_reused"]
    for path in sorted(glob.glob(os.path.join(ref, "*", "*.tar")) + glob.glob(os.path.join(ref, "*", "*.jsonl"))):
        with open(path, "rb") as a, open(path.replace(ref, out), "rb") as b:
            assert a.read() == b.read(), path
    assert json.load(open(os.path.join(out, COMPLETE_FILE)))["shards_reused"] == len(finished)
