"""``clip_hf`` / ``clip_backbone``: Hugging Face ``CLIPModel`` in Flax NNX (text tower, vision tower, projections).

Built from ``hf_pretrained``'s ``config.json`` (``model_type = "clip"``); the ``clip_hf`` weight loader
(:mod:`vla_foundry_jax.convert.hf_vision_maps`) fills it. Module paths follow HF's names:

* ``text_model``: :class:`CLIPTextTower`: ``embeddings.token_embedding [V, D_t]`` (``("vocab", "embed")``),
  ``embeddings.position_embedding [P, D_t]`` (``("pos", "embed")``), a causal :class:`~.hf_vision.Encoder` at
  ``encoder``, ``final_layer_norm``;
* ``vision_model``: :class:`~vla_foundry_jax.models.hf_vision.HFVisionTower` (CLIP flavour);
* ``text_projection.kernel [D_t, P]`` / ``visual_projection.kernel [D_v, P]`` (no bias), ``logit_scale`` ``[]``.

``__call__(input_ids, pixel_values, attention_mask=None)`` follows HF ``CLIPModel.forward``:

* text: token + position embeddings, causal attention (keys with ``attention_mask == 0`` are also masked, as HF's
  ``create_causal_mask``), ``final_layer_norm``; pooled at the EOS token exactly as the installed
  ``CLIPTextModel``: when ``eos_token_id == 2`` (legacy configs) the position of the largest id, otherwise the
  *first* position whose id equals ``eos_token_id`` (position 0 if there is none);
* images (channels-last ``[B, img, img, 3]``, or ``[B, N, img, img, 3]``): pooled = ``post_layernorm`` of the
  class token (= token 0 of the vision tower's output);
* ``text_embeds = l2_normalize(text_projection(pooled))``, ``image_embeds = l2_normalize(visual_projection(pooled))``,
  ``logits_per_text = exp(logit_scale) * text_embeds @ image_embeds.T`` and ``logits_per_image`` its transpose
  (5-D images: ``image_embeds [B, N, P]``; the logits use the ``B * N`` images flattened).

Returns a dict with ``text_embeds``, ``image_embeds``, ``logits_per_image``, ``logits_per_text``, and also the
pooled, pre-projection ``text_pooled`` / ``image_pooled`` (either half is absent when its input is None).
Difference from the original ``CLIPHF`` wrapper (reference §3.7): it computes ``text_projection(l2_normalize(
pooled))`` (normalised *before* projection) and multiplies by ``attention_mask_images``; those belong to the
backbone wrapper, which can build them from ``text_pooled``. Here the outputs are HF ``CLIPModel``'s.

Freezing: ``freeze_text_encoder`` / ``freeze_image_encoder`` put ``text_model`` / ``vision_model`` outside the
optimizer (:func:`frozen_paths`, registered with ``registry.register_frozen_paths``); projections and
``logit_scale`` stay trainable. Loss (:func:`clip_contrastive_loss`, registered for ``clip_hf``): the original
has no CLIP loss; this is the standard symmetric InfoNCE (mean of the image->text and text->image
cross-entropies over the in-batch pairs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.configs.clip import LEGACY_EOS_ID, CLIPConfig, CLIPTextConfig, clip_config
from vla_foundry_jax.convert.hf_vision_maps import load_clip_hf_weights
from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.layers.norms import make_norm
from vla_foundry_jax.models.hf_vision import Encoder, HFVisionTower
from vla_foundry_jax.params.model_params import CLIPHFParams
from vla_foundry_jax.registry import ModelRecord, register_model


class TextEmbeddings(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.dtype = dtype
        D = c.hidden_size
        tok = jax.random.normal(rngs.params(), (c.vocab_size, D), jnp.float32) * 0.02
        pos = jax.random.normal(rngs.params(), (c.max_position_embeddings, D), jnp.float32) * 0.01
        self.token_embedding = nnx.Param(tok.astype(param_dtype), out_sharding=("vocab", "embed"))
        self.position_embedding = nnx.Param(pos.astype(param_dtype), out_sharding=("pos", "embed"))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.token_embedding[...], input_ids, axis=0).astype(self.dtype)
        return x + self.position_embedding[...][: input_ids.shape[-1]].astype(self.dtype)


class CLIPTextTower(nnx.Module):
    """``input_ids [B, S]`` (S <= max_position_embeddings) -> ``(last_hidden_state [B, S, D], pooled [B, D])``."""

    def __init__(self, c: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, remat_policy: Any = None):
        self.config = c
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.embeddings = TextEmbeddings(c, rngs=rngs, **kw)
        self.encoder = Encoder(c, rngs=rngs, remat_policy=remat_policy, **kw)
        self.final_layer_norm = make_norm("default_layer_norm", c.hidden_size, c.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"clip_hf expects input_ids [B, S], got shape {tuple(input_ids.shape)}.")
        B, S = input_ids.shape
        if S > c.max_position_embeddings:
            raise ValueError(
                f"clip_hf: text length {S} exceeds the text tower's max_position_embeddings = "
                f"{c.max_position_embeddings}."
            )
        allowed = jnp.tril(jnp.ones((S, S), bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
        # A query with every key masked (left padding) attends uniformly instead of producing NaN.
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), bias))
        if c.eos_token_id == LEGACY_EOS_ID:
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        return x, x[jnp.arange(B), pos]


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nnx.Module):
    """HF ``CLIPModel`` (``type = "clip_hf"`` and ``"clip_backbone"``); see the module docstring."""

    def __init__(
        self,
        c: CLIPConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str | None = None,
        where: str = "clip_hf",
    ):
        self.config = c
        self.dtype = dtype
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.text_model = CLIPTextTower(c.text, remat_policy=remat_policy, **kw)
        self.vision_model = HFVisionTower(c.vision, remat_policy=remat_policy, where=where, **kw)
        P = c.projection_dim
        self.text_projection = Dense(c.text.hidden_size, P, bias=False, names=("embed", None), **kw)
        self.visual_projection = Dense(c.vision.hidden_size, P, bias=False, names=("embed", None), **kw)
        self.logit_scale = nnx.Param(jnp.asarray(c.logit_scale_init_value, param_dtype), out_sharding=())

    def get_projection_dim(self) -> int:
        return self.config.projection_dim

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        _, pooled = self.text_model(input_ids, attention_mask)
        return {"text_pooled": pooled, "text_embeds": _l2_normalize(self.text_projection(pooled))}

    def encode_images(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        pooled = self.vision_model(pixel_values)[..., 0, :]
        return {"image_pooled": pooled, "image_embeds": _l2_normalize(self.visual_projection(pooled))}

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        out: dict[str, jax.Array] = {}
        if input_ids is not None:
            out |= self.encode_text(input_ids, attention_mask)
        if pixel_values is not None:
            out |= self.encode_images(pixel_values)
        if input_ids is not None and pixel_values is not None:
            images = out["image_embeds"].reshape(-1, out["image_embeds"].shape[-1])
            scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
            out["logits_per_text"] = jnp.dot(out["text_embeds"], images.T) * scale
            out["logits_per_image"] = out["logits_per_text"].T
        return out


def frozen_paths(params: Any) -> list[tuple[str, ...]]:
    """Module paths (relative to the CLIP model) that ``freeze_text_encoder`` / ``freeze_image_encoder`` freeze."""
    out = []
    if params.freeze_text_encoder:
        out.append(("text_model",))
    if params.freeze_image_encoder:
        out.append(("vision_model",))
    return out


def build_clip(
    config: CLIPConfig,
    params: Any,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat_policy: str | None = None,
) -> CLIPModel:
    """A :class:`CLIPModel` of ``config`` with random parameters (the type's weight loader fills them)."""
    return CLIPModel(
        config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy, where=params.gin_name
    )


def build_clip_hf(params: Any, *, rngs: nnx.Rngs, **kwargs: Any) -> CLIPModel:
    """Registry builder for ``clip_hf`` (``clip_backbone``'s is in :mod:`vla_foundry_jax.models.backbones`)."""
    return build_clip(clip_config(params), params, rngs=rngs, **kwargs)


def clip_contrastive_loss(
    model: CLIPModel, batch: dict[str, jax.Array], *, hparams: Any = None, rng: Any = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over in-batch pairs (``input_ids [B, S]``, ``pixel_values [B, img, img, 3]``, optional
    ``attention_mask``): the i-th text matches the i-th image. Not in the original (it trains no CLIP)."""
    del hparams, rng
    out = model(batch["input_ids"], batch["pixel_values"], batch.get("attention_mask"))
    logits = out["logits_per_text"]
    labels = jnp.arange(logits.shape[0])
    t2i = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1))
    i2t = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits.T, axis=-1), labels[:, None], axis=-1))
    loss = 0.5 * (t2i + i2t)
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, {"contrastive_loss": loss, "text_to_image_accuracy": acc}


register_model(
    ModelRecord(
        params=CLIPHFParams,
        builder=build_clip_hf,
        loss=clip_contrastive_loss,
        weight_loader=load_clip_hf_weights,
        frozen_paths=frozen_paths,
    )
)
