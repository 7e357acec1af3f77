"""``host_memory``: freed host memory is reused across XLA:CPU executions (page faults counted in real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vla_foundry_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one execution needs a 64 MB temporary buffer (exp(x), sorted); prints the fewest page faults of executions 4-20
# (under concurrent load glibc's heap can fragment, so some executions still fault in fresh pages: see the module)
_FAULTS = """
import json, resource
from vla_foundry_jax import host_memory
applied = host_memory.keep_freed_host_memory()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 8192), jnp.float32) * 0.01
f = jax.jit(lambda x: jnp.sort(jnp.exp(x), axis=0)[0].sum())
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults_per_step": min(faults[3:])}))
"""


def _faults(setting: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", VLA_FOUNDRY_KEEP_HOST_MEMORY=setting, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_host_memory_is_reused_across_executions():
    default, kept = _faults("0"), _faults("1")
    assert not default["applied"] and kept["applied"]
    # glibc's default: the 64 MB temporary buffer is a fresh mmap per execution (16,384 pages faulted in), always
    assert default["faults_per_step"] > 8000, default
    assert kept["faults_per_step"] < default["faults_per_step"] / 10, (kept, default)


def test_auto_follows_the_backend_jax_will_use(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.jax_will_use_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.jax_will_use_cpu()
    assert host_memory.keep_freed_host_memory("auto") is False
    assert host_memory.keep_freed_host_memory("0") is False


def test_a_bad_setting_is_one_error_line():
    env = dict(os.environ, VLA_FOUNDRY_KEEP_HOST_MEMORY="yes")
    done = subprocess.run(
        [sys.executable, "-m", "launch.train", "--gin_file=quickstart.gin"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: VLA_FOUNDRY_KEEP_HOST_MEMORY='yes'"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
