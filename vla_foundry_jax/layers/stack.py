"""Stacked layers: ``L`` blocks created with ``nnx.vmap`` (a leading ``layers`` axis) and applied with ``nnx.scan``,
so compile time does not grow with depth; optional rematerialisation with a ``jax.checkpoint_policies`` policy.

The stacked parameters carry the logical axis :data:`LAYERS_AXIS` first (replicated by ``parallel.LOGICAL_RULES``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

LAYERS_AXIS = "layers"
# On CPU, stacks of at most this many layers are unrolled by :func:`scan_layers`: XLA:CPU zero-fills and copies every
# stacked per-layer residual of a scan on each step (~5% of diffusion_policy's train step with its 2-layer
# denoiser, 10-30% of a small ViT's); unrolled, they are plain buffers. Accelerators, and deeper stacks (compile time
# grows with depth), keep the loop.
CPU_UNROLL_MAX_LAYERS = 4
# Names in ``jax.checkpoint_policies`` that are policies themselves (not policy factories).
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)

M = TypeVar("M", bound=nnx.Module)


def check_remat_policy(remat_policy: str | None) -> None:
    """Raise unless ``remat_policy`` is None (no remat) or one of :data:`REMAT_POLICIES`."""
    if remat_policy is not None and remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy = {remat_policy!r} is not supported; choose None or one of {REMAT_POLICIES}.")


def remat(fn: Callable[..., Any], remat_policy: str | None) -> Callable[..., Any]:
    """``fn`` under ``nnx.remat`` with ``jax.checkpoint_policies.<remat_policy>``; ``fn`` itself for None."""
    if remat_policy is None:
        return fn
    return nnx.remat(fn, policy=getattr(jax.checkpoint_policies, remat_policy))


def stack_layers(make: Callable[..., M], n: int, rngs: nnx.Rngs, *per_layer: jax.Array) -> M:
    """``n`` modules ``make(nnx.Rngs(params=key_i), *[a[i] for a in per_layer])`` stacked on a leading
    :data:`LAYERS_AXIS` (keys: ``jax.random.split(rngs.params(), n)``)."""

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def make_layers(key: jax.Array, *args: jax.Array) -> M:
        return make(nnx.Rngs(params=key), *args)

    return make_layers(jax.random.split(rngs.params(), n), *per_layer)


def scan_layers(
    step: Callable[..., Any],
    layers: nnx.Module,
    carry: Any,
    *args: Any,
    in_axes: tuple[Any, ...] = (),
    out_axes: Any = nnx.Carry,
    remat_policy: str | None = None,
    unroll: int | bool | None = None,
) -> Any:
    """Apply ``step(layer, carry, *args)`` over the stacked ``layers`` with ``nnx.scan``.

    ``in_axes`` gives one entry per ``args`` (0: sliced per layer, None: broadcast); ``step`` returns the new
    carry (``out_axes = nnx.Carry``) or ``(carry, per-layer outputs)`` (``out_axes = (nnx.Carry, 0)``).
    ``remat_policy`` rematerialises each step (:func:`remat`); ``unroll`` as ``jax.lax.scan``'s, None: unrolled
    on the CPU backend for at most :data:`CPU_UNROLL_MAX_LAYERS` layers, else one loop.
    """
    if unroll is None:
        depth = jax.tree.leaves(nnx.state(layers, nnx.Param))[0].shape[0]
        unroll = jax.default_backend() == "cpu" and depth <= CPU_UNROLL_MAX_LAYERS
    step = remat(step, remat_policy)

    @nnx.scan(
        in_axes=(0, nnx.Carry, *in_axes),
        out_axes=out_axes,
        unroll=unroll,
        transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS},
    )
    def run(layer: nnx.Module, carry: Any, *a: Any) -> Any:
        return step(layer, carry, *a)

    return run(layers, carry, *args)
