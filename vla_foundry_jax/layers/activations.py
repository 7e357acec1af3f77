"""Activation functions by the names model configs use (Hugging Face ``hidden_act``, diffusers ``act_fn``)."""

from __future__ import annotations

from collections.abc import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "mish": jax.nn.mish,
    "relu": jax.nn.relu,
}


def activations(*names: str) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """The sub-table of :data:`ACTIVATIONS` a model family supports, in the order given."""
    return {name: ACTIVATIONS[name] for name in names}
