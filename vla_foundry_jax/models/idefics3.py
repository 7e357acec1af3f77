"""Idefics3 / SmolVLM (``vlm_hf`` with HF ``model_type`` ``idefics3`` or ``smolvlm``) in Flax NNX.

Both HF model types share the same maths (``SmolVLMForConditionalGeneration`` is generated from Idefics3's code), so
one module serves both, built from the existing parts:

* ``vision_tower``: :class:`~vla_foundry_jax.models.hf_vision.HFVisionTower` (SigLIP family) from the
  ``idefics3_vision`` / ``smolvlm_vision`` config; output ``post_layernorm``-ed tokens (HF's ``last_hidden_state``).
  HF's ``Idefics3VisionEmbeddings`` derives position ids from a patch attention mask (NaViT-style bucketing of
  fractional patch coordinates, for padded / variable-size images). Only full images of the configured
  ``image_size`` are supported: there the intended position ids are ``0 .. n_p - 1`` in row-major order, which is
  what the tower adds. (HF computes them with float32 ``arange`` / ``bucketize``; for a few grid sides, e.g. 19, 25,
  29, 31 patches, its rounding repeats a position id and the two then differ; SmolVLM's 32 and Idefics3's 26 give the
  identity.)
* ``connector``: HF's ``Idefics3Connector``: pixel shuffle with factor ``scale_factor`` (HF's ordering is exactly
  :func:`~vla_foundry_jax.layers.pixel_shuffle.pixel_shuffle`'s: output token ``(bi, bj)`` row-major, channels in
  (row-offset, col-offset, channel) order), then the bias-free ``modality_projection.proj``
  ``Linear(D * s^2 -> text hidden)`` (parameter ``connector.kernel``);
* ``language_model``: :class:`~vla_foundry_jax.models.hf_decoder.HFDecoder` (Llama in the released checkpoints; also
  the other non-Gemma decoders ``transformer_hf`` supports). The ``lm_head`` is tied when the *top-level* config's
  ``tie_word_embeddings`` is set (HF 5.x ties on the top-level flag).

Forward ``(input_ids [B, S], pixel_values [B, N, img, img, 3] or [B, img, img, 3] channels-last)``: each image gives
``T = (img / patch)^2 / s^2`` tokens; they replace the ``image_token_id`` positions in (sample, image, token) order
(each sample must hold exactly its own ``N * T`` image tokens). Attention is causal, as HF's; ``token_type_ids``
(optional, not an HF input here) turns on the same prefix-LM mask as PaliGemma's.

Not supported: HF's image splitting / tiling (the processor's sub-image grid is just more images of the configured
size, but their row/column marker tokens are the caller's job), padded or variable-size images
(``pixel_attention_mask``), and HF's dropping of all-zero padding images (every image here gets its tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.layers.pixel_shuffle import pixel_shuffle
from vla_foundry_jax.models.hf_decoder import Dense, HFDecoder, HFDecoderConfig, UnsupportedArchitectureError
from vla_foundry_jax.models.hf_vision import HFVisionConfig, HFVisionTower
from vla_foundry_jax.models.hf_vlm_common import HFVLM
from vla_foundry_jax.models.vlm import merge_image_tokens

MODEL_TYPES = ("idefics3", "smolvlm")
VISION_MODEL_TYPES = ("idefics3_vision", "smolvlm_vision")


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
        if mt not in MODEL_TYPES:
            raise UnsupportedArchitectureError(f"Idefics3 expects model_type in {MODEL_TYPES}, got {mt!r}.")
        vc = config.vision_config
        vmt = getattr(vc, "model_type", None)
        if vmt not in VISION_MODEL_TYPES:
            raise UnsupportedArchitectureError(f"{mt} expects a vision_config in {VISION_MODEL_TYPES}, got {vmt!r}.")
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


class Idefics3(HFVLM):
    """Idefics3 / SmolVLM (``type = "vlm_hf"``); ``__call__`` returns the LM's :class:`TransformerOutput`."""

    def __init__(
        self,
        config: Idefics3Config,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
    ):
        self.config = config
        self.dtype = dtype
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype, "remat_policy": remat_policy}
        self.vision_tower = HFVisionTower(config.vision, where="vlm_hf.vision_tower", **kw)
        self.connector = Dense(
            config.vision.hidden_size * config.scale_factor**2,
            config.text.hidden_size,
            bias=False,
            names=("mlp", "embed"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.language_model = HFDecoder(config.text, **kw)

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """``[B, N, img, img, 3]`` (or ``[B, img, img, 3]``) -> connector output ``[B, N * T, H]``."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        feats = self.vision_tower(pixel_values)  # [B, N, n_p, D]
        return self.connector(pixel_shuffle(feats, self.config.scale_factor))  # [B, N * n_p / s^2, H]

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
        """Token embeddings with the image positions replaced by image tokens, ``[B, S, H]``."""
        is_img = input_ids == self.config.image_token_id
        tokens = self.language_model.embed(input_ids)
        if pixel_values is None:
            return tokens
        images = self.encode_images(pixel_values).astype(tokens.dtype)
        return merge_image_tokens(tokens, images, is_img)
