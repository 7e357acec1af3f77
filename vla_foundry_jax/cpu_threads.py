"""Pin XLA:CPU's compute threads one per core, for low latency after idle gaps (serving, rollouts).

XLA:CPU computes on a pool of worker threads, one per core. When a call follows an idle gap (a robot asking for
its next action chunk every 100 ms), the sleeping workers are woken and Linux may place two of them on the same
core, where they take turns until the load balancer moves one: the call runs on one core for several milliseconds
(policy_sampling on 2 cores: 21 ms back to back, 30 ms after 100 ms idle, with ~15 involuntary context switches
per call instead of 0). With each worker pinned to its own core the call after an idle gap takes 22 ms.
PyTorch's OpenMP threads spin-wait between calls instead, which hides the same effect at the cost of busy cores.

The policy server, rollouts (:class:`~vla_foundry_jax.serving.policy.Policy`) and the training loop pin on the CPU
backend; ``VLA_FOUNDRY_PIN_CPU_THREADS=0`` leaves the threads to the OS scheduler everywhere. A training step
gains little back to back but no longer has the slow steps that follow an evaluation or checkpoint pause
(vit_tiny, 2 cores: p90 50 -> 35 ms, median 35.6 -> 33.6 ms).
"""

from __future__ import annotations

import logging
import os
import sys

import jax

from vla_foundry_jax.errors import UsageError

ENV = "VLA_FOUNDRY_PIN_CPU_THREADS"  # "0": never pin; unset, "1" or "auto": pin on the CPU backend
WORKER_THREAD_NAME = "tf_XLAEigen"  # the name jaxlib gives XLA:CPU's intra-op worker threads

logger = logging.getLogger(__name__)


def xla_cpu_worker_threads() -> list[int]:
    """Thread ids of this process's XLA:CPU worker threads (Linux; an empty list elsewhere)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    workers = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith(WORKER_THREAD_NAME):
                    workers.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(workers)


def pinning_enabled() -> bool:
    """``VLA_FOUNDRY_PIN_CPU_THREADS``: False for "0", True when unset, "1" or "auto"; anything else is a UsageError
    naming the variable."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("0", "1", "auto", ""):
        raise UsageError(f"{ENV}={value!r} is not a setting; use 1 or auto (pin on the CPU backend) or 0 (never)")
    return value != "0"


def pin_xla_cpu_workers() -> dict[int, int]:
    """Pin each XLA:CPU worker thread to its own core of this process's allowed cores; returns ``{tid: core}``.

    Nothing is pinned (``{}``) with ``VLA_FOUNDRY_PIN_CPU_THREADS=0``, where JAX's backend is not the CPU, off
    Linux, when the workers are not found, or when there are more workers than allowed cores (pinning cannot then
    give each its own core).
    """
    if not pinning_enabled() or jax.default_backend() != "cpu" or not sys.platform.startswith("linux"):
        return {}
    workers = xla_cpu_worker_threads()  # jax.default_backend() above started the CPU client and its pool
    cores = sorted(os.sched_getaffinity(0))
    if not workers or len(workers) > len(cores):
        logger.info("XLA:CPU workers not pinned: %d worker thread(s), %d allowed core(s)", len(workers), len(cores))
        return {}
    pinned = {}
    for tid, core in zip(workers, cores, strict=False):
        try:
            os.sched_setaffinity(tid, {core})
        except OSError as exc:  # a thread that ended, or a sandbox that forbids it: leave the rest as they are
            logger.info("XLA:CPU worker %d not pinned to core %d: %s", tid, core, exc)
            continue
        pinned[tid] = core
    logger.info("XLA:CPU worker threads pinned one per core: %s", pinned)
    return pinned
