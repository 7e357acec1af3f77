"""Feed-forward blocks (MLPs) on ``[..., H]``, built from :class:`~vla_foundry_jax.layers.dense.Dense`.

* :class:`FeedForward`: the two blocks of the original (reference §2.2), bias-free:
  ``swiglu``: hidden ``F = 256 * ceil(floor(8H/3) / 256)``; fused ``w12: H -> 2F`` whose first half is the gate;
  ``y = w3(silu(gate) * up)``; ``gelu``: ``w1: H -> 4H``, exact (erf) GELU, ``w2: 4H -> H`` (the original's
  state-dict indices 0 and 2).
* :class:`MLP`: ``fc2(act(fc1(x)))`` (Hugging Face CLIP / SigLIP encoders, the from-scratch ViT).
* :class:`GatedMLP`: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Hugging Face Llama-family decoders).

Logical axis names: ``("embed", "mlp")`` for the up projections, ``("mlp", "embed")`` for the down projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.params.model_params import FFN_TYPES


def swiglu_hidden_dim(dim: int) -> int:
    """The original's SwiGLU hidden width: ``256 * ceil(floor(8 * dim / 3) / 256)``."""
    return 256 * math.ceil((8 * dim // 3) / 256)


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
        kw = {"rngs": rngs, "bias": False, "dtype": dtype, "param_dtype": param_dtype}
        if ffn_type == "swiglu":
            self.hidden_dim = swiglu_hidden_dim(dim)
            self.w12 = Dense(dim, 2 * self.hidden_dim, std=in_std, names=("embed", "mlp"), **kw)
            self.w3 = Dense(self.hidden_dim, dim, std=out_std, names=("mlp", "embed"), **kw)
        else:
            self.hidden_dim = 4 * dim
            self.w1 = Dense(dim, self.hidden_dim, std=in_std, names=("embed", "mlp"), **kw)
            self.w2 = Dense(self.hidden_dim, dim, std=out_std, names=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.ffn_type == "swiglu":
            gate, up = jnp.split(self.w12(x), 2, axis=-1)
            return self.w3(jax.nn.silu(gate) * up)
        return self.w2(jax.nn.gelu(self.w1(x), approximate=False))


class MLP(nnx.Module):
    """``fc2(act(fc1(x)))``: ``fc1: dim -> hidden``, ``fc2: hidden -> dim``; ``dense`` options go to both layers."""

    def __init__(self, dim: int, hidden: int, *, act: Callable[[jax.Array], jax.Array], rngs: nnx.Rngs, **dense: Any):
        self.act = act
        self.fc1 = Dense(dim, hidden, names=("embed", "mlp"), rngs=rngs, **dense)
        self.fc2 = Dense(hidden, dim, names=("mlp", "embed"), rngs=rngs, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with ``gate/up: dim -> hidden``, ``down: hidden -> dim``."""

    def __init__(self, dim: int, hidden: int, *, act: Callable[[jax.Array], jax.Array], rngs: nnx.Rngs, **dense: Any):
        self.act = act
        self.gate_proj = Dense(dim, hidden, names=("embed", "mlp"), rngs=rngs, **dense)
        self.up_proj = Dense(dim, hidden, names=("embed", "mlp"), rngs=rngs, **dense)
        self.down_proj = Dense(hidden, dim, names=("mlp", "embed"), rngs=rngs, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
