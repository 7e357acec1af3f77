"""``vlm_hf``: a whole Hugging Face VLM from one checkpoint, in Flax NNX (reference §3.6).

The builder reads ``vlm_hf.hf_pretrained``'s ``config.json`` (:func:`~vla_foundry_jax.configs.vlm_hf.vlm_hf_config`)
and dispatches on its ``model_type``. Implemented: ``paligemma`` (PaliGemma: Gemma text model; PaliGemma 2: the same
``model_type`` with a ``gemma2`` ``text_config``), built from the existing parts, and ``idefics3`` / ``smolvlm``
(:class:`~vla_foundry_jax.models.idefics3.Idefics3`, see that module) and ``qwen2_vl`` / ``qwen2_5_vl`` /
``qwen3_vl`` (:class:`~vla_foundry_jax.models.qwen_vl.QwenVL`, see that module):

* ``vision_tower``: the SigLIP tower of :mod:`~vla_foundry_jax.models.hf_vision` (``post_layernorm``-ed tokens, HF's
  ``last_hidden_state``; the attention-pooling head is not built);
* ``multi_modal_projector``: ``Linear(vision hidden -> projection_dim = text hidden, bias)``; HF 5.x applies no
  further scaling to the image features (older versions divided by ``sqrt(H)`` and scaled the whole sequence, the
  same result), and ``inputs_embeds`` enter the Gemma stack unscaled while text embeddings get Gemma's ``sqrt(H)``;
* ``language_model``: :class:`~vla_foundry_jax.models.hf_decoder.HFDecoder` (Gemma / Gemma2, tied ``lm_head``,
  Gemma2's final logit soft-cap).

Forward ``(input_ids [B, S], pixel_values [B, N, img, img, 3] or [B, img, img, 3] channels-last, token_type_ids,
attention_mask, cache)``: image features (``[B, N * T, H]``, ``T = (img / patch)^2``) replace the ``image_token_id``
positions in (sample, image, token) order (each sample must hold exactly its own ``N * T`` image tokens; HF checks
only the batch total); text positions take the (Gemma-scaled) token embeddings (an image token id past the
vocabulary looks up row 0, as HF's, so a generated image-token id embeds as HF embeds it).
With ``token_type_ids`` the attention is **prefix-LM**: tokens with ``token_type_ids == 0`` (image + prompt) attend
to each other bidirectionally, the rest causally (HF's ``block_sequence_ids`` overlay, also across Gemma2's sliding
window); without it, plain causal. HF numbers PaliGemma's positions from 1: RoPE depends only on position
differences, so positions from 0 (as here) give the same attention.

Training (loss ``vlm_hf``) follows ``vlm``: next-token cross-entropy on the caption tokens only (``loss_mask``, or
every non-image target), with ``token_type_ids`` used when the batch carries them. Generation:
:func:`~vla_foundry_jax.models.generation.generate` with ``pixel_values`` (and PaliGemma's ``token_type_ids`` for a
prefix-LM prefill); greedy tokens equal HF ``generate``'s (tests/test_vlm_hf.py, tests/test_idefics3.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.configs.qwen_vl import QwenVLConfig
from vla_foundry_jax.configs.vlm_hf import Idefics3Config, PaliGemmaConfig, vlm_hf_config
from vla_foundry_jax.convert.vlm_hf_maps import load_vlm_hf_weights
from vla_foundry_jax.layers.losses import cross_entropy_with_z_loss
from vla_foundry_jax.models.hf_vlm_common import HFVLM, check_image_tokens
from vla_foundry_jax.models.idefics3 import Idefics3
from vla_foundry_jax.models.qwen_vl import QwenVL, check_inputs, check_sample_inputs
from vla_foundry_jax.params.model_params import VLMHFParams
from vla_foundry_jax.registry import ModelRecord, register_model


class PaliGemma(HFVLM):
    """PaliGemma / PaliGemma 2 (``type = "vlm_hf"``); ``__call__`` returns the LM's :class:`TransformerOutput`."""

    def __init__(
        self,
        config: PaliGemmaConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
    ):
        self.multi_modal_projector = self._build_towers(
            config,
            projector_in=config.vision.hidden_size,
            projector_bias=True,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            remat_policy=remat_policy,
        )

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """``[B, N, img, img, 3]`` (or ``[B, img, img, 3]``) -> projected image tokens ``[B, N * T, H]``."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        feats = self.multi_modal_projector(self.vision_tower(pixel_values))  # [B, N, T, H]
        return feats.reshape(feats.shape[0], -1, feats.shape[-1])

    def _lookup_ids(self, input_ids: jax.Array, is_img: jax.Array) -> jax.Array:
        """As HF: an image-token id past the embedding table looks up row 0."""
        if self.config.image_token_id >= self.config.text.vocab_size:
            return jnp.where(is_img, 0, input_ids)
        return input_ids


def check_batch(params: Any, batch: dict[str, np.ndarray]) -> None:
    """Host-side check of a training batch (registered for ``vlm_hf``)."""
    config = vlm_hf_config(params)
    if isinstance(config, QwenVLConfig):
        pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        check = check_sample_inputs if grid is not None and np.ndim(pixels) == 3 else check_inputs
        check(config, batch["input_ids"], pixels, grid)
        return
    check_image_tokens(config, batch["input_ids"], batch.get("pixel_values"))


def build_vlm_hf(
    params: Any,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat_policy: str | None = None,
) -> PaliGemma | Idefics3 | QwenVL:
    """Registry builder for ``type = "vlm_hf"`` (random parameters; the ``vlm_hf`` weight loader fills them)."""
    config = vlm_hf_config(params)
    if isinstance(config, QwenVLConfig):
        return QwenVL(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)
    cls = Idefics3 if isinstance(config, Idefics3Config) else PaliGemma
    return cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)


def vlm_hf_loss(model: PaliGemma, batch: dict[str, jax.Array], *, hparams: Any, rng: jax.Array | None = None) -> Any:
    """Next-token loss on caption tokens only (``loss_mask``; else every non-image target), as ``vlm``."""
    ids = batch["input_ids"]
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = batch["loss_mask"][:, 1:] if "loss_mask" in batch else targets != model.image_token_id
    tt = batch.get("token_type_ids")
    extra = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
    out = model(inputs, batch.get("pixel_values"), token_type_ids=None if tt is None else tt[:, :-1], **extra)
    return cross_entropy_with_z_loss(out.logits, targets, mask, hparams.z_loss_coefficient)


register_model(
    ModelRecord(
        params=VLMHFParams,
        builder=build_vlm_hf,
        loss=vlm_hf_loss,
        weight_loader=load_vlm_hf_weights,
        batch_check=check_batch,
    )
)
