"""Positional embeddings (reference §2.4).

* ``rotary``: GPT-NeoX rotate-half RoPE, base 10000, on ``[B, S, nh, hd]`` after the head split.
  ``inv_freq[j] = 1 / 10000^(2j/hd)`` is computed in float32 and then **rounded to the activation dtype**
  (the original rebuilds its table with ``inv_freq.to(k.dtype)``), angles ``p * inv_freq`` are formed in
  float32, and cos/sin are rounded to the activation dtype before the rotation. In float32 this is plain RoPE.
  The original keeps ``inv_freq`` as a state-dict buffer; here it is a constant recomputed at trace time.
* ``rotary_float32``: the same rotation computed entirely in float32 (inputs upcast, exact float32
  frequencies), outputs cast back to the input dtype.
* ``learned``: **not in the original LLM** (ours): an absolute position table ``[max_seq_len, H]``, initialised
  N(0, 0.02), added to the token embeddings; logical axes ``("pos", "embed")``.
* ``none``: identity.

Positions are absolute: with a KV cache they start at the cache length.

:func:`mrope_axes` / :func:`mrope_positions`: the multimodal RoPE of the Qwen-VL decoders (each rotary frequency
driven by the temporal, height or width position of a token).

:func:`sinusoidal_embedding` is the diffusion timestep embedding (reference §3.8.1; diffusers'
``get_timestep_embedding``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROPE_BASE = 10000.0


def rotary_inv_freq(head_dim: int, base: float = ROPE_BASE) -> jax.Array:
    """``1 / base^(2j/hd)`` for ``j = 0 .. hd/2 - 1`` in float32, shape ``[hd/2]``."""
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotary_cos_sin(positions: jax.Array, head_dim: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[..., S, 1, hd]`` in ``dtype`` for integer ``positions [..., S]``.

    ``inv_freq`` is rounded to ``dtype`` before the float32 outer product, as the original does.
    """
    inv_freq = rotary_inv_freq(head_dim).astype(dtype).astype(jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., S, hd/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., S, 1, hd]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(
    q: jax.Array, k: jax.Array, positions: jax.Array, *, float32: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Rotate ``q [B, S, nh, hd]`` and ``k [B, S, nh, hd]`` by absolute ``positions [S]`` (or ``[B, S]``).

    ``float32=True`` is ``rotary_float32``. Outputs keep the input dtypes.
    """
    head_dim = q.shape[-1]
    if float32:
        cos, sin = rotary_cos_sin(positions, head_dim, jnp.float32)
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        return (
            (qf * cos + rotate_half(qf) * sin).astype(q.dtype),
            (kf * cos + rotate_half(kf) * sin).astype(k.dtype),
        )
    cos, sin = rotary_cos_sin(positions, head_dim, k.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LearnedPositionalEmbedding(nnx.Module):
    """Absolute position table (ours, see module doc): ``positions [..., S] -> [..., S, H]``."""

    def __init__(
        self,
        max_seq_len: int,
        dim: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        std: float = 0.02,
    ):
        self.dtype = dtype
        self.embedding = nnx.Param(
            (jax.random.normal(rngs.params(), (max_seq_len, dim), jnp.float32) * std).astype(param_dtype),
            out_sharding=("pos", "embed"),
        )

    def __call__(self, positions: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], positions, axis=0).astype(self.dtype)


def sinusoidal_embedding(
    t: jax.Array, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: float = 1.0
) -> jax.Array:
    """Timestep embedding ``[..., dim]`` (float32) of ``t [...]``: ``concat(sin(t f), cos(t f))`` (``[cos, sin]`` when
    ``flip_sin_to_cos``) with ``half = dim // 2`` frequencies ``f_i = exp(-ln(10000) i / (half - freq_shift))``,
    formed in float32 as torch does; an odd ``dim`` gets a last zero column.

    ``freq_shift = 1`` is the original's UNet / diffusion-policy sinusoid (reference §3.8.1, sin block first);
    diffusers' ``Timesteps`` passes its ``downscale_freq_shift``.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = jnp.exp(jnp.asarray(exponent, jnp.float32))
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, dim % 2)])


def mrope_axes(section: tuple[int, ...], interleaved: bool) -> np.ndarray:
    """Which position axis (0 temporal, 1 height, 2 width) drives each of the ``sum(section)`` rotary frequencies
    of multimodal RoPE (M-RoPE).

    Qwen2-VL / Qwen2.5-VL: consecutive blocks of ``section[0]``, ``section[1]``, ``section[2]`` frequencies.
    Qwen3-VL (``interleaved``): frequency ``j`` is height when ``j % 3 == 1`` and ``j < 3 * section[1]``, width when
    ``j % 3 == 2`` and ``j < 3 * section[2]``, temporal otherwise.
    """
    n = sum(section)
    if not interleaved:
        return np.repeat(np.arange(len(section)), section)
    j = np.arange(n)
    axes = np.zeros(n, np.int32)
    for axis in (1, 2):
        axes[(j % 3 == axis) & (j < 3 * section[axis])] = axis
    return axes


def mrope_positions(positions: jax.Array, axes: np.ndarray) -> jax.Array:
    """Per-frequency positions ``[B, S, hd/2]`` of M-RoPE from ``positions [3, B, S]`` (temporal, height, width)
    and :func:`mrope_axes`; the rotary angle of frequency ``j`` is ``result[..., j] * inv_freq[j]``."""
    return jnp.moveaxis(positions, 0, -1)[..., jnp.asarray(axes)]
