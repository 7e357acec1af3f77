"""Vision-language backbones of ``diffusion_policy`` (§3.10): the interface, ``clip_backbone``, ``vit_backbone``.

**Interface** (:class:`VisionLanguageBackbone`; ``vlm_backbone`` / ``vlm_foundry_backbone`` live in
:mod:`vla_foundry_jax.models.vlm_backbones`): every backbone module has

* ``conditioning_dim: int`` (the original's ``get_conditioning_embeddings_dim()``, ``D_bb``) and
* ``__call__(input_ids, pixel_values, attention_mask=None, attention_mask_images=None) -> [B, Nc, D_bb]``
  (the original's ``get_action_conditioning(...).embeddings``), with ``input_ids [B, S]`` int,
  ``pixel_values`` channels-last ``[B, N, H, W, 3]`` (``[B, H, W, 3]`` is one camera), ``attention_mask [B, S]``
  and ``attention_mask_images [B, N]`` (1 = a real camera image);

and is built by ``registry.build_model(backbone_params, rngs=..., dtype=..., param_dtype=..., remat_policy=...)``
under its type key. The policy holds it at attribute ``vision_language_backbone``.

The wrappers here *are* the wrapped models (subclasses), not holders of one: the parameter paths stay those of
``clip_hf`` / ``vit`` directly under ``vision_language_backbone.``, so the registered weight loaders
(``clip_hf`` safetensors, ``vit.pretrained``) and CLIP's ``freeze_text_encoder`` / ``freeze_image_encoder`` hook
apply unchanged. (The original's state dict nests them under ``vision_language_backbone._model.``; a converter of
original policy checkpoints drops that ``_model.`` level.)

``clip_backbone`` (:class:`CLIPBackbone`, ``D_bb = projection_dim``): conditioning
``[text_embeds[:, None], image_embeds]`` -> ``[B, 1 + N, D]``, as the original's ``CLIPHF`` wrapper:

* ``text_embeds = text_projection(l2_normalize(pooled_text))`` — normalised *before* the projection (the
  original's quirk, kept: these are not unit-norm); the text tower runs **without** the attention mask, as the
  original (CLIP's text attention is causal and pads follow the EOS token, so the pooled EOS vector is the same);
* ``image_embeds = l2_normalize(visual_projection(pooled_image))`` per camera, **multiplied by**
  ``attention_mask_images`` (padded cameras give zero tokens; they still occupy their slot in the sequence);
* ``disable_text`` (or ``input_ids=None``) drops the text token -> ``[B, N, D]``; ``pixel_values=None`` leaves the
  text token only.

Parameters the backbone never reads get no gradient; torch's AdamW skips such parameters entirely, whereas an optax
AdamW would still decay them. So they are kept out of the optimizer through the frozen-paths hook: ``logit_scale``
always, and ``text_model`` / ``text_projection`` when ``disable_text``; plus CLIP's own freeze flags.

``vit_backbone`` (:class:`ViTBackbone`, ``D_bb = hidden_dim``): a from-scratch ViT (``vit.pretrained`` may start
it) over every camera: ``[B, N, H, W, 3] -> [B, N, n_p, D] -> [B, N * n_p, D]`` camera-major (``cls_flag``: one
token per camera, ``[B, N, D]``). Text is ignored. **Difference**: the original ignores ``attention_mask_images``
here; this port zeroes a padded camera's tokens as ``clip_backbone`` does (identical when every camera is present).

``freeze=True`` on a backbone's params puts all of it outside the optimizer (``training/state.py``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.convert.hf_vision_maps import load_clip_hf_weights
from vla_foundry_jax.convert.vit_weights import load_vit_weights
from vla_foundry_jax.models.clip import CLIPModel, _l2_normalize, clip_config
from vla_foundry_jax.models.clip import frozen_paths as clip_frozen_paths
from vla_foundry_jax.models.vit import ViT
from vla_foundry_jax.params.model_params import CLIPBackboneParams, ViTBackboneParams
from vla_foundry_jax.registry import ModelRecord, register_model


@runtime_checkable
class VisionLanguageBackbone(Protocol):
    """What ``diffusion_policy`` needs from a backbone (module docstring)."""

    conditioning_dim: int

    def __call__(
        self,
        input_ids: jax.Array | None,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
        attention_mask_images: jax.Array | None = None,
    ) -> jax.Array: ...


def as_cameras(pixel_values: jax.Array, where: str) -> jax.Array:
    """Channels-last images as ``[B, N, H, W, 3]`` (a 4-D ``[B, H, W, 3]`` is one camera)."""
    if pixel_values.ndim == 4:
        return pixel_values[:, None]
    if pixel_values.ndim != 5:
        raise ValueError(
            f"{where} expects channels-last pixel_values [B, N, H, W, 3] (or [B, H, W, 3]), got shape "
            f"{tuple(pixel_values.shape)}."
        )
    return pixel_values


def mask_cameras(tokens: jax.Array, attention_mask_images: jax.Array | None, where: str) -> jax.Array:
    """``tokens [B, N, ...]`` times ``attention_mask_images [B, N]`` (zeroes padded cameras' tokens)."""
    if attention_mask_images is None:
        return tokens
    m = jnp.asarray(attention_mask_images)
    if m.shape != tokens.shape[:2]:
        raise ValueError(
            f"{where}: attention_mask_images has shape {tuple(m.shape)} but the images are "
            f"[B, N] = {tuple(tokens.shape[:2])}."
        )
    return tokens * m.reshape(m.shape + (1,) * (tokens.ndim - 2)).astype(tokens.dtype)


class CLIPBackbone(CLIPModel):
    """``clip_backbone``: a :class:`CLIPModel` whose call returns conditioning tokens ``[B, (1+) N, D]``."""

    def __init__(self, params: CLIPBackboneParams, *, rngs: nnx.Rngs, **kwargs: Any):
        super().__init__(clip_config(params), rngs=rngs, where=params.gin_name, **kwargs)
        self.disable_text = bool(params.disable_text)
        self.where = params.gin_name

    @property
    def conditioning_dim(self) -> int:
        return self.config.projection_dim

    def __call__(
        self,
        input_ids: jax.Array | None,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
        attention_mask_images: jax.Array | None = None,
    ) -> jax.Array:
        """Conditioning tokens ``[B, Nc, projection_dim]`` in the compute dtype (module docstring)."""
        del attention_mask  # the original runs the text tower without it
        parts = []
        if input_ids is not None and not self.disable_text:
            _, pooled = self.text_model(input_ids)
            parts.append(self.text_projection(_l2_normalize(pooled))[:, None])
        if pixel_values is not None:
            images = as_cameras(pixel_values, self.where)
            pooled = self.vision_model(images)[..., 0, :]
            embeds = _l2_normalize(self.visual_projection(pooled))
            parts.append(mask_cameras(embeds, attention_mask_images, self.where))
        if not parts:
            raise ValueError(
                f"{self.where} got neither text nor images (input_ids is None or disable_text, and pixel_values "
                "is None); it needs at least one."
            )
        return jnp.concatenate([p.astype(self.dtype) for p in parts], axis=1)


class ViTBackbone(ViT):
    """``vit_backbone``: a :class:`ViT` whose call returns camera-major patch tokens ``[B, N * n_p, D]``."""

    @property
    def conditioning_dim(self) -> int:
        return self.params.hidden_dim

    def __call__(
        self,
        input_ids: jax.Array | None,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
        attention_mask_images: jax.Array | None = None,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Patch tokens of every camera ``[B, N * n_p, hidden_dim]`` (``cls_flag``: ``[B, N, hidden_dim]``).

        ``deterministic`` / ``rngs``: ViT dropout (``vit_backbone.dropout``), as :meth:`ViT.__call__`; the policy's
        training forward passes ``deterministic=False`` with a key.
        """
        del input_ids, attention_mask
        where = self.params.gin_name
        if pixel_values is None:
            raise ValueError(f"{where} needs pixel_values (it conditions on images only).")
        images = as_cameras(pixel_values, where)
        tokens = super().__call__(images, deterministic=deterministic, rngs=rngs)  # [B, N, n_p, D] or [B, N, D]
        tokens = mask_cameras(tokens, attention_mask_images, where)
        return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


def build_clip_backbone(params: CLIPBackboneParams, *, rngs: nnx.Rngs, **kwargs: Any) -> CLIPBackbone:
    """Registry builder for ``type = "clip_backbone"`` (random weights; the ``clip_hf`` loader fills them)."""
    return CLIPBackbone(params, rngs=rngs, **kwargs)


def clip_backbone_frozen_paths(params: CLIPBackboneParams) -> list[tuple[str, ...]]:
    """CLIP's freeze flags, plus the parameters the backbone never reads (module docstring)."""
    out = [*clip_frozen_paths(params), ("logit_scale",)]
    if params.disable_text:
        out += [("text_model",), ("text_projection",)]
    return list(dict.fromkeys(out))


def build_vit_backbone(
    params: ViTBackboneParams,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat_policy: str | None = None,
) -> ViTBackbone:
    """Registry builder for ``type = "vit_backbone"``."""
    return ViTBackbone(params, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)


register_model(
    ModelRecord(
        params=CLIPBackboneParams,
        builder=build_clip_backbone,
        weight_loader=load_clip_hf_weights,
        frozen_paths=clip_backbone_frozen_paths,
    )
)
register_model(ModelRecord(params=ViTBackboneParams, builder=build_vit_backbone, weight_loader=load_vit_weights))
