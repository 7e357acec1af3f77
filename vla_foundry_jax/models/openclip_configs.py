"""``clip_openclip``: OpenCLIP architectures (plain ViT image tower + OpenAI-style text tower) as our CLIP model.

``architecture`` (a table name or an OpenCLIP JSON model config) is read by
:func:`~vla_foundry_jax.configs.openclip.openclip_config` into a :class:`~vla_foundry_jax.configs.clip.CLIPConfig`
(which settings are supported: see :mod:`vla_foundry_jax.configs.openclip`) and built as our
:class:`~vla_foundry_jax.models.clip.CLIPModel`; the matching OpenCLIP computation:

* activation: ``nn.GELU`` (exact erf) unless ``quick_gelu`` (the ``-quickgelu`` / OpenAI-weight configs);
* LayerNorm eps ``1e-5``; MLP width ``width * mlp_ratio``; vision heads ``width // head_width``;
* image: class token + learned positions, ``ln_pre``, pre-norm blocks, ``ln_post`` on the class token, ``@ proj``;
* text: token + positions, causal blocks, ``ln_final``, pooled at the **largest token id** (OpenCLIP's default
  ``pool_type = "argmax"``; expressed with our text tower's legacy ``eos_token_id = 2`` argmax pooling),
  ``@ text_projection``.

Freezing: ``freeze_text_encoder`` / ``freeze_image_encoder`` freeze ``text_model`` / ``vision_model`` (as
``clip_hf``); OpenCLIP's ``text_projection`` / ``proj`` / ``logit_scale`` stay trainable. Loss: ``clip_hf``'s
symmetric InfoNCE (:func:`~vla_foundry_jax.models.clip.clip_contrastive_loss`).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from vla_foundry_jax.configs.openclip import openclip_config
from vla_foundry_jax.convert.openclip_maps import load_clip_openclip_weights
from vla_foundry_jax.models.clip import CLIPModel, build_clip, clip_contrastive_loss, frozen_paths
from vla_foundry_jax.params.model_params import CLIP_OpenCLIPParams
from vla_foundry_jax.registry import ModelRecord, register_model


def build_clip_openclip(params: Any, *, rngs: nnx.Rngs, **kwargs: Any) -> CLIPModel:
    """Registry builder for ``clip_openclip`` (the weight loader fills ``pretrained_weights``)."""
    return build_clip(openclip_config(params), params, rngs=rngs, **kwargs)


register_model(
    ModelRecord(
        params=CLIP_OpenCLIPParams,
        builder=build_clip_openclip,
        loss=clip_contrastive_loss,  # the same symmetric InfoNCE as clip_hf
        weight_loader=load_clip_openclip_weights,
        frozen_paths=frozen_paths,
    )
)
