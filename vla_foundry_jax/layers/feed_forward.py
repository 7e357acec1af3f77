"""Bias-free linear layer and the two feed-forward blocks of the original (reference §2.2).

* ``swiglu``: hidden ``F = 256 * ceil(floor(8H/3) / 256)``; fused ``w12: H -> 2F`` whose first half is the gate;
  ``y = w3(silu(gate) * up)``.
* ``gelu``: ``w1: H -> 4H``, exact (erf) GELU, ``w2: 4H -> H`` (the original's state-dict indices 0 and 2).

Kernels are stored ``[in, out]`` (Flax layout; the original's torch weights are ``[out, in]``), in
``param_dtype``, cast to the compute ``dtype`` at use. Logical axis names: ``("embed", "mlp")`` for the
up projection, ``("mlp", "embed")`` for the down projection.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.params.model_params import FFN_TYPES


def trunc_normal(key: jax.Array, shape: tuple[int, ...], std: float | jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Normal(0, std) truncated at +-3 std (torch ``trunc_normal_(std=s, a=-3s, b=3s)``)."""
    return (jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * std).astype(dtype)


def swiglu_hidden_dim(dim: int) -> int:
    """The original's SwiGLU hidden width: ``256 * ceil(floor(8 * dim / 3) / 256)``."""
    return 256 * math.ceil((8 * dim // 3) / 256)


class Linear(nnx.Module):
    """Bias-free ``x [..., in] -> [..., out]``; kernel ``[in, out]`` initialised trunc-normal(``std``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        std: float | jax.Array,
        names: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.dtype = dtype
        self.kernel = nnx.Param(
            trunc_normal(rngs.params(), (in_features, out_features), std, param_dtype), out_sharding=names
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class FeedForward(nnx.Module):
    """``swiglu`` or ``gelu`` MLP: ``x [..., H] -> [..., H]``.

    ``in_std`` initialises the up projection (w12 / w1), ``out_std`` the down projection (w3 / w2).
    """

    def __init__(
        self,
        ffn_type: str,
        dim: int,
        *,
        in_std: float | jax.Array,
        out_std: float | jax.Array,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type = {ffn_type!r} is not supported; choose one of {list(FFN_TYPES)}.")
        self.ffn_type = ffn_type
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        if ffn_type == "swiglu":
            self.hidden_dim = swiglu_hidden_dim(dim)
            self.w12 = Linear(dim, 2 * self.hidden_dim, std=in_std, names=("embed", "mlp"), **kw)
            self.w3 = Linear(self.hidden_dim, dim, std=out_std, names=("mlp", "embed"), **kw)
        else:
            self.hidden_dim = 4 * dim
            self.w1 = Linear(dim, self.hidden_dim, std=in_std, names=("embed", "mlp"), **kw)
            self.w2 = Linear(self.hidden_dim, dim, std=out_std, names=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.ffn_type == "swiglu":
            gate, up = jnp.split(self.w12(x), 2, axis=-1)
            return self.w3(jax.nn.silu(gate) * up)
        return self.w2(jax.nn.gelu(self.w1(x), approximate=False))
