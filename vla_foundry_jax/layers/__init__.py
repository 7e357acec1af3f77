"""Building blocks shared by every model: dense layers, attention kernels, MLPs, norms, convolutions, positional and
timestep embeddings, stacked / scanned / rematerialised layers."""

from vla_foundry_jax.layers.activations import ACTIVATIONS, activations
from vla_foundry_jax.layers.attention import (
    ATTN_NAMES,
    attention_mask,
    dot_product_attention,
    dropout,
    empty_kv_cache,
    head_major_attention,
    segment_attention,
    softmax_attention,
)
from vla_foundry_jax.layers.conv import Conv2d
from vla_foundry_jax.layers.dense import DENSE_INITS, Dense, torch_uniform, trunc_normal
from vla_foundry_jax.layers.feed_forward import FFN_TYPES, MLP, FeedForward, GatedMLP, swiglu_hidden_dim
from vla_foundry_jax.layers.norms import NORM_TYPES, GroupNorm, Norm, make_norm
from vla_foundry_jax.layers.pixel_shuffle import patchify, pixel_shuffle
from vla_foundry_jax.layers.positional import (
    LearnedPositionalEmbedding,
    apply_rotary,
    mrope_axes,
    mrope_positions,
    rotary_cos_sin,
    rotary_inv_freq,
    rotate_half,
    sinusoidal_embedding,
)
from vla_foundry_jax.layers.stack import (
    LAYERS_AXIS,
    REMAT_POLICIES,
    check_remat_policy,
    remat,
    scan_layers,
    stack_layers,
)
from vla_foundry_jax.params.model_params import POSITIONAL_EMBEDDING_TYPES

__all__ = [
    "ACTIVATIONS",
    "ATTN_NAMES",
    "DENSE_INITS",
    "FFN_TYPES",
    "LAYERS_AXIS",
    "MLP",
    "NORM_TYPES",
    "POSITIONAL_EMBEDDING_TYPES",
    "REMAT_POLICIES",
    "Conv2d",
    "Dense",
    "FeedForward",
    "GatedMLP",
    "GroupNorm",
    "LearnedPositionalEmbedding",
    "Norm",
    "activations",
    "apply_rotary",
    "attention_mask",
    "check_remat_policy",
    "dot_product_attention",
    "dropout",
    "empty_kv_cache",
    "head_major_attention",
    "make_norm",
    "mrope_axes",
    "mrope_positions",
    "patchify",
    "pixel_shuffle",
    "remat",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "rotate_half",
    "scan_layers",
    "segment_attention",
    "sinusoidal_embedding",
    "softmax_attention",
    "stack_layers",
    "swiglu_hidden_dim",
    "torch_uniform",
    "trunc_normal",
]
