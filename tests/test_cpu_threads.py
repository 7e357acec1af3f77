"""Pinning XLA:CPU's worker threads (vla_foundry_jax.cpu_threads), checked in fresh processes on real threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.multidevice import subprocess_env
from tests.fixtures.paths import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread affinity via /proc is Linux")

_REPORT = """
import json, os, sys
cores = sys.argv[1]
if cores != "all":
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})  # before jax starts any thread: all inherit it
from vla_foundry_jax.cpu_threads import pin_xla_cpu_workers, xla_cpu_worker_threads
import jax.numpy as jnp
pinned = pin_xla_cpu_workers()
(jnp.ones((256, 256)) @ jnp.ones((256, 256))).block_until_ready()  # the pool computes with its new affinity
workers = xla_cpu_worker_threads()
print(json.dumps({
    "allowed": sorted(os.sched_getaffinity(0)),
    "workers": {str(t): sorted(os.sched_getaffinity(t)) for t in workers},
    "pinned": {str(t): c for t, c in pinned.items()},
}))
"""


def _report(cores: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _REPORT, cores], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_worker_is_pinned_to_its_own_allowed_core():
    r = _report("all")
    assert r["workers"], "no XLA:CPU worker thread found (did jaxlib rename tf_XLAEigen?)"
    assert r["pinned"].keys() == r["workers"].keys()
    for tid, core in r["pinned"].items():
        assert r["workers"][tid] == [core]  # the thread's real affinity, read back from the kernel
    cores = sorted(r["pinned"].values())
    assert len(set(cores)) == len(cores) and set(cores) <= set(r["allowed"])
    assert r["allowed"] == sorted(os.sched_getaffinity(0))  # the process (main thread) keeps every core


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to restrict the process to one")
def test_more_workers_than_allowed_cores_pins_nothing():
    r = _report(str(min(os.sched_getaffinity(0))))
    assert r["allowed"] == [min(os.sched_getaffinity(0))]
    if len(r["workers"]) > 1:  # XLA sized its pool by the machine's cores, not by the process's affinity
        assert r["pinned"] == {}
        assert all(v == r["allowed"] for v in r["workers"].values())
    else:
        assert r["pinned"] == {tid: r["allowed"][0] for tid in r["workers"]}


def test_the_variable_turns_pinning_off_and_a_bad_value_is_named(monkeypatch):
    from vla_foundry_jax.cpu_threads import ENV, pin_xla_cpu_workers, pinning_enabled
    from vla_foundry_jax.errors import UsageError

    monkeypatch.setenv(ENV, "0")
    assert not pinning_enabled() and pin_xla_cpu_workers() == {}
    for on in ("1", "auto", " AUTO "):
        monkeypatch.setenv(ENV, on)
        assert pinning_enabled()
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(UsageError, match="VLA_FOUNDRY_PIN_CPU_THREADS='yes' is not a setting"):
        pin_xla_cpu_workers()
