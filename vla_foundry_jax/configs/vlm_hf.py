"""Whole-VLM architectures for ``vlm_hf``: PaliGemma (1 / 2) and Idefics3 / SmolVLM, read from the HF config.

:func:`vlm_hf_config` dispatches on ``model_type`` (:data:`SUPPORTED_MODEL_TYPES`): ``paligemma`` ->
:class:`PaliGemmaConfig` (SigLIP tower, projector, Gemma / Gemma2 LM), ``idefics3`` / ``smolvlm`` ->
:class:`Idefics3Config` (SigLIP-like tower, pixel-shuffle connector, non-Gemma decoder LM), ``qwen2_vl`` /
``qwen2_5_vl`` / ``qwen3_vl`` -> :class:`~vla_foundry_jax.configs.qwen_vl.QwenVLConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vla_foundry_jax.configs.hf_decoder import HFDecoderConfig, UnsupportedArchitectureError
from vla_foundry_jax.configs.hf_hub import load_hf_config
from vla_foundry_jax.configs.hf_vision import HFVisionConfig
from vla_foundry_jax.configs.qwen_vl import QWEN_VL_MODEL_TYPES, QwenVLConfig
from vla_foundry_jax.params.base import ParamsError

IDEFICS3_MODEL_TYPES = ("idefics3", "smolvlm")
IDEFICS3_VISION_MODEL_TYPES = ("idefics3_vision", "smolvlm_vision")
SUPPORTED_MODEL_TYPES = ("paligemma", *IDEFICS3_MODEL_TYPES, *QWEN_VL_MODEL_TYPES)


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """A PaliGemma (1 or 2) checkpoint's architecture: SigLIP tower, projector, Gemma / Gemma2 LM."""

    vision: HFVisionConfig
    text: HFDecoderConfig
    image_token_id: int

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_tokens

    @classmethod
    def from_hf(cls, config: Any) -> PaliGemmaConfig:
        vision = HFVisionConfig.from_hf(config.vision_config)
        if vision.family != "siglip":
            raise UnsupportedArchitectureError(f"PaliGemma expects a SigLIP vision tower, got {vision.family!r}.")
        text = HFDecoderConfig.from_hf(config.text_config)
        if text.model_type not in ("gemma", "gemma2"):
            raise UnsupportedArchitectureError(
                f"PaliGemma expects a gemma / gemma2 text_config, got {text.model_type!r}."
            )
        proj = getattr(config.vision_config, "projection_dim", text.hidden_size)
        if proj != text.hidden_size:
            raise UnsupportedArchitectureError(
                f"vision_config.projection_dim = {proj} differs from text_config.hidden_size = {text.hidden_size}."
            )
        token = getattr(config, "image_token_id", None)
        token = getattr(config, "image_token_index", None) if token is None else token
        return cls(vision=vision, text=text, image_token_id=int(token))


@dataclasses.dataclass(frozen=True)
class Idefics3Config:
    """An Idefics3 / SmolVLM checkpoint's architecture: SigLIP-like tower, pixel-shuffle connector, decoder LM."""

    vision: HFVisionConfig
    text: HFDecoderConfig
    image_token_id: int
    scale_factor: int
    model_type: str = "idefics3"

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches // (self.scale_factor**2)

    @classmethod
    def from_hf(cls, config: Any) -> Idefics3Config:
        mt = getattr(config, "model_type", None)
        if mt not in IDEFICS3_MODEL_TYPES:
            raise UnsupportedArchitectureError(f"Idefics3 expects model_type in {IDEFICS3_MODEL_TYPES}, got {mt!r}.")
        vc = config.vision_config
        vmt = getattr(vc, "model_type", None)
        if vmt not in IDEFICS3_VISION_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"{mt} expects a vision_config in {IDEFICS3_VISION_MODEL_TYPES}, got {vmt!r}."
            )
        if getattr(vc, "num_channels", 3) != 3:
            raise UnsupportedArchitectureError(f"{mt} expects 3-channel images; config has {vc.num_channels}.")
        if vc.image_size % vc.patch_size:
            raise UnsupportedArchitectureError(
                f"patch_size = {vc.patch_size} does not divide image_size = {vc.image_size}."
            )
        vision = HFVisionConfig(
            **HFVisionConfig.fields_from_hf(vc),
            family="siglip",
            image_size=int(vc.image_size),
            patch_size=int(vc.patch_size),
        )
        s = int(config.scale_factor)
        side = vision.image_size // vision.patch_size
        if s < 1 or side % s:
            raise UnsupportedArchitectureError(
                f"scale_factor = {s} does not divide the {side} x {side} patch grid (image_size / patch_size)."
            )
        text = HFDecoderConfig.from_hf(config.text_config)
        if text.norm_offset or text.embed_scale is not None:
            raise UnsupportedArchitectureError(
                f"{mt} with a {text.model_type!r} text_config is not supported (Gemma's embedding scaling would "
                "apply to the image features too); use a Llama-family text model."
            )
        text = dataclasses.replace(text, tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
        return cls(vision=vision, text=text, image_token_id=int(config.image_token_id), scale_factor=s, model_type=mt)


def vlm_hf_config(params: Any) -> PaliGemmaConfig | Idefics3Config | QwenVLConfig:
    """The architecture of ``params.hf_pretrained`` (a ``VLMHFParams``), dispatched on ``model_type``."""
    if not params.hf_pretrained:
        raise ParamsError(f"{params.gin_name}.hf_pretrained is not set; give a hub id or a local directory.")
    cfg = load_hf_config(params.hf_pretrained)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r} has model_type {mt!r}; vlm_hf supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (PaliGemma 2 is model_type 'paligemma' with a gemma2 text_config)."
        )
    if mt in IDEFICS3_MODEL_TYPES:
        return Idefics3Config.from_hf(cfg)
    if mt in QWEN_VL_MODEL_TYPES:
        return QwenVLConfig.from_hf(cfg)
    return PaliGemmaConfig.from_hf(cfg)
