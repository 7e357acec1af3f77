"""Shared benchmark plumbing: build a one-device train step for any model type and time it."""

from __future__ import annotations

import resource
import time
from typing import Any

import jax
import numpy as np

from vla_foundry_jax import parallel
from vla_foundry_jax.params import DistributedParams, EMAParams, HyperParams, ModelParams
from vla_foundry_jax.registry import get_loss
from vla_foundry_jax.training.optimizer import make_optimizer
from vla_foundry_jax.training.state import count_params, init_train_state, make_model_spec
from vla_foundry_jax.training.step import make_train_step


def build_step(params: ModelParams, *, batch: int, precision: str = "fp32", devices: int = 1) -> tuple[Any, Any]:
    """(state, jitted train step) of ``params``, data-parallel over the first ``devices`` devices."""
    hp = HyperParams(precision=precision, global_batch_size=batch, per_gpu_batch_size=batch // devices, warmup="10")
    mesh = parallel.make_mesh(DistributedParams(), jax.devices()[:devices])
    spec = make_model_spec(params, hp, mesh)
    opt = make_optimizer(hp, 1000)
    state = init_train_state(spec, opt, hp, use_ema=False)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(
        spec, get_loss(params.type), opt, hp, EMAParams(), accum_steps=1, total_steps=1000, state_shardings=shardings
    )
    return state, step


def time_step(state: Any, step: Any, batches: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """Compile once, warm up once, then the median of ``steps`` timed steps; ``peak_rss_mb`` is this process's peak
    resident host memory so far (``getrusage``), which includes the compile and the first step."""
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batches[0])
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return {
        "compile_s": round(compile_s, 3),
        "step_s_median": round(float(np.median(times)), 4),
        "params": count_params(state["params"]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
