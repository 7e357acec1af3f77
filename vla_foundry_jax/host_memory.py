"""Keep freed host memory inside the process, so XLA:CPU does not fault in fresh pages on every step.

XLA:CPU allocates each execution's temporary buffer (95 MB for the ViT-tiny train step, gigabytes for a UNet) with
``posix_memalign`` from one of its worker threads. glibc serves a block that large from a per-thread arena only by a
fresh ``mmap`` and returns it with ``munmap`` when the step ends, so every step faults in and zeroes every page of
the buffer again: 23,000 page faults, a third of the ViT-tiny step on 2 cores; 256,000 for the preset UNet. PyTorch's
per-op tensors mostly fit under glibc's adaptive mmap threshold (32 MB at most); its larger ones pay the same.

:func:`keep_freed_host_memory` makes glibc serve every thread from the main heap (``M_ARENA_MAX = 1``), never by
``mmap`` (``M_MMAP_MAX = 0``) and never give freed memory back (``M_TRIM_THRESHOLD = -1``; any finite threshold,
at most 2 GB through ``mallopt``, lets a UNet's buffer be trimmed again each step), so the second step reuses
the first step's pages. The cost: resident memory stays at its peak instead of shrinking between steps. It must run
before jaxlib is imported: that import starts a thread, and a thread that already took a malloc arena of its own
keeps it (glibc may also hand that arena to later threads). ``import vla_foundry_jax`` calls it first thing. Where
the backend is an accelerator the big buffers live on the device, so ``"auto"`` leaves the allocator alone there.

Not a guarantee: under heavy concurrent load the main heap can fragment (small blocks carved out of the freed buffer),
and some steps then take fresh pages again (seen in 2 of 6 runs of a 64 MB-buffer loop beside a running test suite).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import sys

from vla_foundry_jax.errors import UsageError

ENV = "VLA_FOUNDRY_KEEP_HOST_MEMORY"  # "1": always, "0": never, unset / "auto": when JAX will run on the CPU

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")

applied: bool = False
"""Whether this process's allocator settings were changed (by :func:`keep_freed_host_memory`)."""


def jax_will_use_cpu() -> bool:
    """Whether JAX's default backend will be the CPU: ``JAX_PLATFORMS`` names it first, or no accelerator plugin is
    installed. Decided without starting a JAX backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def setting(mode: str | None = None) -> str:
    """``mode``, else the ``VLA_FOUNDRY_KEEP_HOST_MEMORY`` variable, else ``"auto"``: one of ``"1"``, ``"0"``,
    ``"auto"``; anything else is a UsageError naming the variable."""
    mode = (mode if mode is not None else os.environ.get(ENV, "auto")).strip().lower()
    if mode not in ("1", "0", "auto"):
        raise UsageError(f"{ENV}={mode!r} is not a setting; use 1 (always), 0 (never) or auto (on the CPU backend)")
    return mode


def keep_freed_host_memory(mode: str | None = None) -> bool:
    """Apply the allocator settings of the module docstring; returns whether they were applied.

    ``mode``: ``"1"`` always, ``"0"`` never, ``"auto"`` when JAX will run on the CPU (default: :func:`setting`). A
    no-op on anything but Linux with glibc.
    """
    global applied
    mode = setting(mode)
    if mode == "0" or (mode == "auto" and not jax_will_use_cpu()):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    applied = applied or ok
    if ok:
        logging.getLogger(__name__).info("host memory: freed blocks are kept for reuse (glibc: one arena, no mmap)")
    return ok
