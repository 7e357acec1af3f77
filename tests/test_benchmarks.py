"""The speed benchmarks keep working: each runs its scaled-down mode once (figures are not checked, only shape)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_compare_quick_runs_both_sides_interleaved():
    (row,) = _run("benchmarks/compare.py", "--quick", "--workloads=vit_tiny", "--rounds=2", "--steps=1", "--json")
    assert row["workload"] == "vit_tiny" and row["rounds"] == 2
    assert row["ours_s"] > 0 and row["torch_s"] > 0 and 0 < row["ratio_min"] <= row["ratio_median"]
    assert row["ours_peak_rss_mb"] > 0


def test_compare_rejects_an_unknown_workload():
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "benchmarks/compare.py", "--workloads=resnet"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: unknown workload(s) ['resnet']")


def test_mfu_cpu_small_prints_flops_and_throughput():
    (row,) = _run("benchmarks/mfu.py", "--cpu_small", "--models=transformer_1b", "--steps=1", "--precision=fp32")
    assert row["model"] == "transformer_1b" and row["tokens_per_s"] > 0 and row["model_tflops_per_step"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread affinity is Linux")
def test_idle_latency_quick_times_pinned_and_unpinned_for_each_gap():
    rows = _run("benchmarks/idle_latency.py", "--quick", "--gaps_ms=0,30", "--rounds=2", "--calls=2")
    assert [r["gap_ms"] for r in rows] == [0.0, 30.0]
    for r in rows:
        assert 0 < r["pinned_ms_median"] <= r["pinned_ms_p90"] and 0 < r["unpinned_ms_median"] <= r["unpinned_ms_p90"]
        assert r["unpinned_over_pinned"] == round(r["unpinned_ms_median"] / r["pinned_ms_median"], 2)


def test_idle_latency_rejects_bad_gaps_in_one_line():
    env = dict(os.environ, PYTHONPATH=ROOT)
    for bad in ("--gaps_ms=abc", "--gaps_ms=-5", "--gaps_ms="):
        cmd = [sys.executable, "benchmarks/idle_latency.py", bad]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith(f"error: --gaps_ms={bad.split('=')[1]!r}"), done.stderr
        assert "Traceback" not in done.stderr
