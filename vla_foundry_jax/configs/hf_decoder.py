"""The ``transformer_hf`` architecture read from an HF decoder config (:class:`HFDecoderConfig`).

Supported ``model_type`` values: :data:`SUPPORTED_ARCHITECTURES` (see :mod:`vla_foundry_jax.models.hf_decoder` for
what each implies); only the default RoPE. :class:`UnsupportedArchitectureError` is the error of every config reader
here for a config whose architecture (or an option of it) is not implemented.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vla_foundry_jax.configs.hf_hub import load_hf_config
from vla_foundry_jax.errors import VLAFoundryError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
# hidden activations the decoder implements (the functions: ``models.hf_decoder.ACTIVATIONS``)
ACTIVATION_NAMES = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu")
FULL_WINDOW = 2**30  # "no sliding window"


class UnsupportedArchitectureError(VLAFoundryError, ValueError):
    """An HF config whose ``model_type`` (or an option of it) ``transformer_hf`` does not implement."""


def supported_model_type(config: Any, supported: Any, who: str) -> str:
    """``config.model_type``; :class:`UnsupportedArchitectureError` naming ``who`` when it is not in ``supported``."""
    mt = getattr(config, "model_type", None)
    if mt not in supported:
        raise UnsupportedArchitectureError(
            f"{who} does not support HF model_type {mt!r}; supported: {', '.join(supported)}."
        )
    return mt


@dataclasses.dataclass(frozen=True)
class HFDecoderConfig:
    """The architecture facts the Flax module needs, read from an HF ``PretrainedConfig``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    norm_offset: bool  # Gemma: HF norms multiply by (1 + w)
    embed_scale: float | None
    activation: str
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    sandwich_norms: bool  # Gemma2's post-attention / pre- and post-FFN norms
    windows: tuple[int, ...]  # per-layer sliding window (FULL_WINDOW = global attention)
    # multimodal RoPE (the Qwen-VL decoders): frequencies per (temporal, height, width) axis, and Qwen3-VL's
    # interleaved layout; empty = plain RoPE
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False

    @classmethod
    def from_hf(cls, config: Any) -> HFDecoderConfig:
        mt = supported_model_type(config, SUPPORTED_ARCHITECTURES, "transformer_hf")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedArchitectureError(
                f"transformer_hf implements only the default RoPE; this {mt} config has rope_parameters = {rope}."
            )
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        H, nh = config.hidden_size, config.num_attention_heads
        hd = getattr(config, "head_dim", None) or H // nh
        nkv = getattr(config, "num_key_value_heads", None) or nh
        if nh % nkv:
            raise UnsupportedArchitectureError(
                f"num_key_value_heads = {nkv} does not divide num_attention_heads = {nh}."
            )
        L = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and window is not None:
            windows = tuple(window if t == "sliding_attention" else FULL_WINDOW for t in layer_types)
        elif mt == "mistral" and window is not None:
            windows = (window,) * L
        else:
            windows = (FULL_WINDOW,) * L
        attention_bias = bool(getattr(config, "attention_bias", False))
        gemma = mt in ("gemma", "gemma2")
        act = getattr(config, "hidden_activation", None) if mt == "gemma2" else None
        act = act or getattr(config, "hidden_act", "silu")
        if act not in ACTIVATION_NAMES:
            raise UnsupportedArchitectureError(
                f"hidden activation {act!r} is not supported; choose {list(ACTIVATION_NAMES)}."
            )
        return cls(
            model_type=mt,
            vocab_size=config.vocab_size,
            hidden_size=H,
            intermediate_size=config.intermediate_size,
            num_layers=L,
            num_heads=nh,
            num_kv_heads=nkv,
            head_dim=hd,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(theta),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else (attention_bias and mt != "mistral"),
            o_bias=attention_bias and mt not in ("qwen2", "mistral"),
            mlp_bias=bool(getattr(config, "mlp_bias", False)) and mt == "llama",
            qk_norm=mt == "qwen3",
            norm_offset=gemma,
            embed_scale=float(H) ** 0.5 if gemma else None,
            activation=act,
            attn_scale=float(config.query_pre_attn_scalar) ** -0.5 if mt == "gemma2" else float(hd) ** -0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None) if mt == "gemma2" else None,
            final_softcap=getattr(config, "final_logit_softcapping", None) if mt == "gemma2" else None,
            sandwich_norms=mt == "gemma2",
            windows=tuple(int(w) for w in windows),
        )


def hf_decoder_config(params: Any) -> HFDecoderConfig:
    """The :class:`HFDecoderConfig` of a ``TransformerHFParams`` (config read from ``hf_pretrained``)."""
    return HFDecoderConfig.from_hf(load_hf_config(params.hf_pretrained))
