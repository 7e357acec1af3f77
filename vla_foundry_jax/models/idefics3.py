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

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.configs.vlm_hf import Idefics3Config
from vla_foundry_jax.layers.pixel_shuffle import pixel_shuffle
from vla_foundry_jax.models.hf_vlm_common import HFVLM


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
        self.connector = self._build_towers(
            config,
            projector_in=config.vision.hidden_size * config.scale_factor**2,
            projector_bias=False,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            remat_policy=remat_policy,
        )

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """``[B, N, img, img, 3]`` (or ``[B, img, img, 3]``) -> connector output ``[B, N * T, H]``."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        feats = self.vision_tower(pixel_values)  # [B, N, n_p, D]
        return self.connector(pixel_shuffle(feats, self.config.scale_factor))  # [B, N * n_p / s^2, H]
