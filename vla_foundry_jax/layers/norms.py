"""Normalisation layers: every ``norm_type`` of the original (reference §2.1).

All norms act on the last axis of ``x [..., dim]`` and return ``[..., dim]`` in the compute ``dtype`` (or
``x.dtype`` when ``dtype`` is None). Parameters live in ``param_dtype`` and carry the logical axis name
given as ``axis_name`` (``"norm"`` in the models).

* ``default_layer_norm``: LayerNorm (biased variance) computed in float32, as torch runs layer_norm under
  autocast; params weight (1), bias (0).
* ``lp_layer_norm``: input, weight and bias first rounded to the compute dtype; statistics accumulated in float32
  (as torch's bf16 layer_norm kernels do); output in the compute dtype. Same as the default in float32.
* ``gain_only_lp_layer_norm``: ``lp_layer_norm`` without bias.
* ``gain_only_layer_norm``: float32 LayerNorm, gain only.
* ``no_wb_layer_norm``: float32 LayerNorm with neither gain nor bias.
* ``rms_norm``: ``(x_f32 * rsqrt(mean(x_f32^2) + eps)).astype(x.dtype) * weight`` (normalise in float32, cast
  back, then apply the weight).

:class:`GroupNorm` (the UNets') normalises channel groups of channels-last feature maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.params.model_params import NORM_TYPES

_HAS_WEIGHT = {"default_layer_norm", "lp_layer_norm", "gain_only_lp_layer_norm", "gain_only_layer_norm", "rms_norm"}
_HAS_BIAS = {"default_layer_norm", "lp_layer_norm"}
_LOW_PRECISION = {"lp_layer_norm", "gain_only_lp_layer_norm"}


def _layer_norm_f32(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """Biased-variance LayerNorm over the last axis; every argument is float32."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class Norm(nnx.Module):
    """One of :data:`NORM_TYPES` over the last axis of ``x [..., dim]``; returns ``[..., dim]``."""

    def __init__(
        self,
        norm_type: str,
        dim: int,
        eps: float = 1e-5,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        axis_name: str | None = "norm",
    ):
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type = {norm_type!r} is not supported; choose one of {list(NORM_TYPES)}.")
        self.norm_type = norm_type
        self.dim = dim
        self.eps = float(eps)
        self.dtype = dtype
        names = (axis_name,)
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=names) if norm_type in _HAS_WEIGHT else None
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=names) if norm_type in _HAS_BIAS else None

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        weight = None if self.weight is None else self.weight[...]
        bias = None if self.bias is None else self.bias[...]
        f32 = jnp.float32
        if self.norm_type == "rms_norm":
            xf = x.astype(f32)
            normed = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
            return (normed.astype(out_dtype) * weight.astype(out_dtype)).astype(out_dtype)
        if self.norm_type in _LOW_PRECISION:
            # Round input and affine parameters to the compute dtype first, then normalise.
            x = x.astype(out_dtype)
            weight = None if weight is None else weight.astype(out_dtype).astype(f32)
            bias = None if bias is None else bias.astype(out_dtype).astype(f32)
        else:
            weight = None if weight is None else weight.astype(f32)
            bias = None if bias is None else bias.astype(f32)
        return _layer_norm_f32(x.astype(f32), weight, bias, self.eps).astype(out_dtype)


def make_norm(
    norm_type: str,
    dim: int,
    eps: float = 1e-5,
    *,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs | None = None,
    axis_name: str | None = "norm",
) -> Norm:
    """Build the norm named ``norm_type`` over ``dim`` features (``rngs`` unused: norms start at 1 / 0)."""
    del rngs
    return Norm(norm_type, dim, eps, dtype=dtype, param_dtype=param_dtype, axis_name=axis_name)


class GroupNorm(nnx.Module):
    """``nn.GroupNorm(groups, c, eps)`` over channels-last ``x [B, ..., C]``: statistics per sample and group over
    every position and the group's ``C / groups`` channels, in float32; ``scale`` 1 / ``bias`` 0 with logical axis
    ``"norm"``; output in the compute ``dtype``."""

    def __init__(self, c: int, groups: int, eps: float = 1e-5, *, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.dtype = dtype
        self.groups = groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((c,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        B, C = x.shape[0], x.shape[-1]
        g = x.astype(jnp.float32).reshape(B, -1, self.groups, C // self.groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)
