"""Layers shared by every model: norms, attention, feed-forward, positional embeddings."""

from vla_foundry_jax.layers.attention import ATTN_NAMES, attention_mask, dot_product_attention, reference_attention
from vla_foundry_jax.layers.feed_forward import FFN_TYPES, FeedForward, Linear, swiglu_hidden_dim, trunc_normal
from vla_foundry_jax.layers.norms import NORM_TYPES, Norm, make_norm
from vla_foundry_jax.layers.positional import (
    LearnedPositionalEmbedding,
    apply_rotary,
    rotary_cos_sin,
    rotary_inv_freq,
    rotate_half,
)
from vla_foundry_jax.params.model_params import POSITIONAL_EMBEDDING_TYPES

__all__ = [
    "ATTN_NAMES",
    "FFN_TYPES",
    "NORM_TYPES",
    "POSITIONAL_EMBEDDING_TYPES",
    "FeedForward",
    "LearnedPositionalEmbedding",
    "Linear",
    "Norm",
    "apply_rotary",
    "attention_mask",
    "dot_product_attention",
    "make_norm",
    "reference_attention",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "rotate_half",
    "swiglu_hidden_dim",
    "trunc_normal",
]
