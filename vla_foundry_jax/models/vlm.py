"""``vlm``: ViT + modality projector + language model (reference §3.5).

Images are channels-last ``[B, N, H, W, 3]`` (N images per sample, e.g. cameras). Their tokens,
pixel-shuffled and projected to the language model's width, replace the ``image_token_id`` positions
of the text sequence in (sample, image, token) order. Unlike the original, which only checks the
batch total, every sample must hold exactly its own number of image tokens
(:func:`check_image_tokens` says how many were expected and found).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.configs.hf_vision import load_vision_config
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.layers.dense import matmul
from vla_foundry_jax.layers.losses import cross_entropy_with_z_loss
from vla_foundry_jax.layers.pixel_shuffle import pixel_shuffle
from vla_foundry_jax.models.transformer import TransformerOutput
from vla_foundry_jax.params import ParamsError, VLMParams
from vla_foundry_jax.registry import ModelRecord, build_module, register_model


class ImageTokenError(VLAFoundryError, ValueError):
    """The text's image tokens do not match the images given with it."""


def vision_geometry(vit: Any) -> tuple[int, int]:
    """``(image side, tokens per image out of the vision tower)`` of ``vlm.vit``.

    ``vit``: from ``img_size`` / ``patch_size`` (1 token with ``cls_flag``: the pooled CLS token). ``vit_hf``: from
    the HF vision config (``image_size`` / ``patch_size``, plus CLIP's class token, which the tower keeps).
    """
    if vit.type == "vit_hf":
        c = load_vision_config(vit.hf_pretrained)  # HF SigLIP / CLIP or timm
        return c.image_size, c.num_tokens
    if getattr(vit, "cls_flag", False):
        return vit.img_size, 1
    return vit.img_size, (vit.img_size // vit.patch_size) ** 2


def image_tokens_per_image(params: VLMParams) -> int:
    """Tokens one image contributes after the projector: tower tokens / s^2 (``s`` = pixel-shuffle factor)."""
    _, tokens = vision_geometry(params.vit)
    return tokens // params.vit.projector_pixel_shuffle_factor**2


def check_batch(params: VLMParams, batch: dict[str, np.ndarray]) -> None:
    """Host-side check of a training batch (registered for ``vlm``): see :func:`check_image_tokens`."""
    check_image_tokens(params, batch["input_ids"], batch.get("pixel_values"))


def check_image_tokens(params: VLMParams, input_ids: np.ndarray, pixel_values: np.ndarray | None) -> None:
    """Host-side check: each sample's image-token count equals its images x tokens per image."""
    ids = np.asarray(input_ids)
    found = (ids == params.image_token_id).sum(axis=-1)
    if pixel_values is None:
        if found.any():
            rows = np.flatnonzero(found).tolist()
            raise ImageTokenError(
                f"samples {rows[:10]} hold image tokens (id {params.image_token_id}) but the batch has no "
                f"pixel_values: every image token needs its image."
            )
        return
    check_image_token_counts(
        found,
        pixel_values,
        params.image_token_id,
        image_tokens_per_image(params),
        hint=" Check data.img_num_tokens against the vision tower's image / patch size and the pixel-shuffle factor.",
    )


def check_image_token_counts(
    found: np.ndarray, pixel_values: np.ndarray | None, image_token_id: int, per_image: int, *, hint: str = ""
) -> None:
    """Host-side check: ``found[b]`` (sample b's image-token count) equals its images x ``per_image``
    (no ``pixel_values``: zero images); raises :class:`ImageTokenError` naming the first sample that disagrees."""
    n_images = 0 if pixel_values is None else (pixel_values.shape[1] if pixel_values.ndim == 5 else 1)
    expected = n_images * per_image
    bad = np.flatnonzero(found != expected)
    if bad.size:
        i = int(bad[0])
        raise ImageTokenError(
            f"sample {i} holds {int(found[i])} image tokens (id {image_token_id}) but its {n_images} "
            f"image(s) give {expected} ({per_image} per image); {bad.size} sample(s) disagree.{hint}"
        )


def merge_image_tokens(tokens: jax.Array, images: jax.Array, is_img: jax.Array) -> jax.Array:
    """Write image tokens ``[B, K, H]`` into the ``is_img [B, S]`` positions of ``tokens [B, S, H]``, in order:
    the k-th image position of a sample takes its k-th image token (counts are checked on the host)."""
    slot = jnp.clip(jnp.cumsum(is_img, axis=-1) - 1, 0, images.shape[1] - 1)
    gathered = jnp.take_along_axis(images, slot[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered, tokens)


class VLM(nnx.Module):
    """Vision-language model; ``__call__`` returns the language model's :class:`TransformerOutput`."""

    def __init__(
        self,
        params: VLMParams,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
    ):
        if params.image_token_id is None:
            raise ParamsError(
                "vlm.image_token_id is not set; it is resolved from the data processor before building "
                "(set image_caption.processor or vlm.processor), or bind vlm.image_token_id."
            )
        vocab = params.transformer.vocab_size
        if not 0 <= params.image_token_id < vocab:
            raise ParamsError(
                f"vlm.image_token_id = {params.image_token_id} is outside the language model's vocabulary "
                f"(transformer.vocab_size = {vocab}); grow the vocabulary or fix the token id."
            )
        self.params = params
        self.dtype = dtype
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype, "remat_policy": remat_policy}
        self.vit = build_module(params.vit, **kw)
        self.transformer = build_module(params.transformer, **kw)
        s = params.vit.projector_pixel_shuffle_factor
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("mlp", "embed"))
        # widths of the built towers (vit_hf / transformer_hf: their HF configs)
        self.projection = nnx.Param(
            init(rngs.params(), (self.vit.hidden_dim * s * s, self.transformer.hidden_dim), param_dtype)
        )

    def encode_images(self, pixel_values: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """``[B, N, H, W, 3]`` (or ``[B, H, W, 3]``) -> image tokens ``[B, N * tokens_per_image, H_lm]``."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        kw = {} if self.params.vit.type == "vit_hf" else {"deterministic": deterministic}  # HF towers: no dropout
        feats = self.vit(pixel_values, **kw)  # [B, N, n, H_vit] (or [B, N, H_vit] with CLS)
        if feats.ndim == 3:
            feats = feats[:, :, None]
        feats = pixel_shuffle(feats, self.params.vit.projector_pixel_shuffle_factor)  # [B, N*n', s^2 H_vit]
        return matmul(feats.astype(self.dtype), self.projection[...].astype(self.dtype))

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None, *, deterministic: bool = True) -> jax.Array:
        """Token embeddings with the image positions replaced by image tokens, ``[B, S, H_lm]``."""
        is_img = input_ids == self.params.image_token_id
        tokens = self.transformer.embed(jnp.where(is_img, 0, input_ids))
        if pixel_values is None:
            return tokens
        images = self.encode_images(pixel_values, deterministic=deterministic).astype(tokens.dtype)
        return merge_image_tokens(tokens, images, is_img)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        cache: Any = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> TransformerOutput:
        """``input_ids [B, S]`` with image tokens, ``pixel_values [B, N, H, W, 3]`` -> LM output."""
        if not isinstance(input_ids, jax.core.Tracer) and (
            pixel_values is None or not isinstance(pixel_values, jax.core.Tracer)
        ):
            check_image_tokens(self.params, input_ids, None if pixel_values is None else np.asarray(pixel_values))
        embeds = self.embed(input_ids, pixel_values, deterministic=deterministic)
        return self.transformer(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            cache=cache,
            output_hidden_states=output_hidden_states,
        )

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> Any:
        return self.transformer.init_cache(batch_size, max_len, dtype)

    @property
    def hidden_dim(self) -> int:
        return self.params.transformer.hidden_dim

    @property
    def num_hidden_layers(self) -> int:
        return self.transformer.num_hidden_layers


def build_vlm(params: VLMParams, *, rngs: nnx.Rngs, **kwargs: Any) -> VLM:
    return VLM(params, rngs=rngs, **kwargs)


def vlm_loss(model: VLM, batch: dict[str, jax.Array], *, hparams: Any, rng: jax.Array | None = None) -> Any:
    """Next-token loss on caption tokens only (``loss_mask`` is False on image tokens and padding)."""
    ids = batch["input_ids"]
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = batch["loss_mask"][:, 1:] if "loss_mask" in batch else targets != model.params.image_token_id
    logits = model(inputs, batch.get("pixel_values")).logits
    return cross_entropy_with_z_loss(logits, targets, mask, hparams.z_loss_coefficient)


register_model(ModelRecord(params=VLMParams, builder=build_vlm, loss=vlm_loss, batch_check=check_batch))
