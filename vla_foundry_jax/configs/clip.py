"""The ``clip_hf`` / ``clip_backbone`` architecture read from an HF ``CLIPModel`` config (:class:`CLIPConfig`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vla_foundry_jax.configs.hf_decoder import UnsupportedArchitectureError
from vla_foundry_jax.configs.hf_hub import load_hf_config
from vla_foundry_jax.configs.hf_vision import EncoderConfig, HFVisionConfig

LEGACY_EOS_ID = 2  # HF: configs from before PR #24773 pool at the argmax of the ids


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(EncoderConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407

    @classmethod
    def from_hf(cls, config: Any) -> CLIPTextConfig:
        eos = getattr(config, "eos_token_id", None)
        if not isinstance(eos, int):
            raise UnsupportedArchitectureError(f"clip_hf needs one integer text eos_token_id; the config has {eos!r}.")
        return cls(
            **cls.fields_from_hf(config),
            vocab_size=int(config.vocab_size),
            max_position_embeddings=int(config.max_position_embeddings),
            eos_token_id=eos,
        )


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig
    vision: HFVisionConfig
    projection_dim: int
    logit_scale_init_value: float

    @classmethod
    def from_hf(cls, config: Any) -> CLIPConfig:
        if getattr(config, "model_type", None) != "clip":
            raise UnsupportedArchitectureError(
                f"clip_hf needs an HF config with model_type 'clip', got {getattr(config, 'model_type', None)!r}."
            )
        return cls(
            text=CLIPTextConfig.from_hf(config.text_config),
            vision=HFVisionConfig.from_hf(config),
            projection_dim=int(config.projection_dim),
            logit_scale_init_value=float(config.logit_scale_init_value),
        )


def clip_config(params: Any) -> CLIPConfig:
    if not params.hf_pretrained:
        raise ValueError(f"{params.gin_name}.hf_pretrained is not set; give a hub id or a local checkpoint directory.")
    return CLIPConfig.from_hf(load_hf_config(params.hf_pretrained))
