"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL architectures (``vlm_hf`` model types ``qwen2_vl``, ``qwen2_5_vl``,
``qwen3_vl``), read from the HF config into :class:`QwenVLConfig`.

The three share one layout (3-D patch embedding, 2-D rotary vision blocks, a 2 x 2 patch merger, a Qwen2 / Qwen3
decoder with multimodal rotary positions) and differ in the vision block's norm / MLP and a few extras:

=============  ==================  ==================  ==================================================
family         vision norms        vision MLP          extras
=============  ==================  ==================  ==================================================
``qwen2_vl``   LayerNorm           fc1 / fc2           -
``qwen2_5_vl`` RMSNorm             gated (gate/up/down) windowed attention except ``fullatt_block_indexes``
``qwen3_vl``   LayerNorm           linear_fc1 / fc2    learned position table (bilinearly resized), patch-embed
                                                       bias, DeepStack mergers, interleaved M-RoPE, qk-norm LM
=============  ==================  ==================  ==================================================
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from vla_foundry_jax.configs.hf_decoder import HFDecoderConfig, UnsupportedArchitectureError

QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# the text decoder family each VLM's language model is (qk-norm for Qwen3)
TEXT_FAMILY = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3"}
VISION_ACTIVATIONS = ("quick_gelu", "silu", "gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen-VL vision tower's architecture facts."""

    family: str  # the VLM model_type
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    activation: str
    rope_theta: float
    window_size: int = 0  # Qwen2.5-VL
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL
    num_position_embeddings: int = 0  # Qwen3-VL
    deepstack_visual_indexes: tuple[int, ...] = ()  # Qwen3-VL

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flat ``pixel_values`` row: ``C * temporal_patch_size * patch_size^2``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def windowed(self) -> bool:
        return self.family == "qwen2_5_vl"

    @property
    def window_merged(self) -> int:
        """Side of one attention window in merged tokens (Qwen2.5-VL)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, family: str, vc: Any) -> QwenVisionConfig:
        rope = dict(getattr(vc, "rope_parameters", None) or {})
        if family == "qwen2_vl":
            hidden, inter = int(vc.embed_dim), int(vc.embed_dim * vc.mlp_ratio)
            out = int(vc.hidden_size)
        else:
            hidden, inter, out = int(vc.hidden_size), int(vc.intermediate_size), int(vc.out_hidden_size)
        act = getattr(vc, "hidden_act", "quick_gelu")
        if act not in VISION_ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"{family} vision_config.hidden_act = {act!r} is not supported; choose {list(VISION_ACTIVATIONS)}."
            )
        heads = int(vc.num_heads)
        if hidden % heads or (hidden // heads) % 4:
            raise UnsupportedArchitectureError(
                f"{family} vision hidden size {hidden} / {heads} heads must give a head dim divisible by 4 (2-D RoPE)."
            )
        windowed, deep = family == "qwen2_5_vl", family == "qwen3_vl"
        c = cls(
            family=family,
            depth=int(vc.depth),
            hidden_size=hidden,
            intermediate_size=inter,
            num_heads=heads,
            out_hidden_size=out,
            patch_size=int(vc.patch_size),
            temporal_patch_size=int(vc.temporal_patch_size),
            spatial_merge_size=int(vc.spatial_merge_size),
            in_channels=int(getattr(vc, "in_channels", 3)),
            activation=act,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            window_size=int(getattr(vc, "window_size", 0) or 0) if windowed else 0,
            fullatt_block_indexes=tuple(getattr(vc, "fullatt_block_indexes", ()) or ()) if windowed else (),
            num_position_embeddings=int(getattr(vc, "num_position_embeddings", 0) or 0) if deep else 0,
            deepstack_visual_indexes=tuple(getattr(vc, "deepstack_visual_indexes", ()) or ()) if deep else (),
        )
        if c.windowed and c.window_merged < 1:
            raise UnsupportedArchitectureError(
                f"qwen2_5_vl window_size = {c.window_size} is smaller than one merged patch "
                f"({c.spatial_merge_size * c.patch_size} pixels)."
            )
        if family == "qwen3_vl" and int(c.num_position_embeddings**0.5) ** 2 != c.num_position_embeddings:
            raise UnsupportedArchitectureError(
                f"qwen3_vl num_position_embeddings = {c.num_position_embeddings} is not a square grid."
            )
        return c


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint's architecture: vision tower + Qwen2 / Qwen3 decoder."""

    model_type: str
    vision: QwenVisionConfig
    text: HFDecoderConfig  # with ``mrope_section`` / ``mrope_interleaved`` set
    image_token_id: int
    vision_start_token_id: int | None = None

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    @classmethod
    def from_hf(cls, config: Any) -> QwenVLConfig:
        mt = getattr(config, "model_type", None)
        if mt not in QWEN_VL_MODEL_TYPES:
            raise UnsupportedArchitectureError(f"Qwen-VL expects model_type in {QWEN_VL_MODEL_TYPES}, got {mt!r}.")
        vision = QwenVisionConfig.from_hf(mt, config.vision_config)
        tc = copy.copy(config.text_config)
        rope = dict(getattr(tc, "rope_parameters", None) or {})
        section = tuple(int(s) for s in rope.get("mrope_section") or ())
        interleaved = bool(rope.get("mrope_interleaved", mt == "qwen3_vl"))
        tc.model_type = TEXT_FAMILY[mt]
        tc.rope_parameters = {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved")}
        text = HFDecoderConfig.from_hf(tc)
        if not section or sum(section) != text.head_dim // 2:
            raise UnsupportedArchitectureError(
                f"{mt} text_config.rope_parameters.mrope_section = {list(section)} must sum to head_dim / 2 = "
                f"{text.head_dim // 2}."
            )
        if vision.out_hidden_size != text.hidden_size:
            raise UnsupportedArchitectureError(
                f"{mt} vision output size {vision.out_hidden_size} differs from text hidden_size {text.hidden_size}."
            )
        tie = getattr(config, "tie_word_embeddings", None)
        tie = getattr(config.text_config, "tie_word_embeddings", False) if tie is None else tie
        text = dataclasses.replace(
            text, tie_word_embeddings=bool(tie), mrope_section=section, mrope_interleaved=interleaved
        )
        start = getattr(config, "vision_start_token_id", None)
        return cls(
            model_type=mt,
            vision=vision,
            text=text,
            image_token_id=int(config.image_token_id),
            vision_start_token_id=None if start is None else int(start),
        )
