"""VLM backbones of ``diffusion_policy`` (reference §3.10.2, §3.10.3): ``vlm_backbone`` and ``vlm_foundry_backbone``.

Both follow the backbone interface of :mod:`vla_foundry_jax.models.backbones` (``conditioning_dim``,
``__call__(input_ids, pixel_values, attention_mask=None, attention_mask_images=None) -> [B, 1, D_bb]``) and, like the
wrappers there, *are* the wrapped model (subclasses), so parameter paths are the VLM's own directly under
``vision_language_backbone.`` (the original nests them under ``vision_language_backbone._model.`` (+ ``model.`` for
HF); a converter of original policy checkpoints drops those levels).

**Action token.** At construction the language model's token table grows from ``V`` to ``V + 1`` rows; the new id
``V`` (the old table size, which may exceed the tokenizer's length) is the action token. Its input-embedding row is
the mean of rows ``0 .. V-1``, re-taken after the source weights are loaded (the original resizes after loading).
The new LM-head column (untied heads only) is a fresh init, as the original's resize: ``normal(0, initializer_range)``
(HF's ``_init_weights``) for ``vlm_backbone``, the ``transformer``'s own trunc-normal ``1/sqrt(H)`` for
``vlm_foundry_backbone``. A tied head reads the grown embedding table.

**Call.** The action token is appended as the **last column** of ``input_ids`` (after any right padding; ``1``
appended to ``attention_mask``); the VLM runs with hidden states; conditioning = the vectors at the last position of
the last ``num_vlm_layers_to_use`` hidden states, concatenated in layer order -> ``[B, 1, n * H]``,
``conditioning_dim = n * H`` (``H`` the language model's width). Which hidden states those are follows the language
model's convention: HF decoders give ``L + 1`` entries (embeddings first, the last one after the final norm),
the from-scratch ``transformer`` gives the ``L`` raw block outputs (none normed). ``attention_mask_images`` is
ignored, as in the original (every image's tokens are in the sequence).

* ``vlm_backbone``: a ``vlm_hf`` model (PaliGemma / PaliGemma 2, Idefics3 / SmolVLM, Qwen2-VL / Qwen2.5-VL /
  Qwen3-VL: camera images patchified in the model, see :class:`QwenVLBackbone`) from ``hf_pretrained``; the
  registered weight loader reads the HF checkpoint (``V`` rows) through the ``vlm_hf`` loader, then grows the table.
  Images must have the checkpoint's ``image_size`` (the processor's job; no resize, as the original).
  With the HF attention mask the action token does not attend to padding.
* ``vlm_foundry_backbone``: a ``vlm`` trained by this project. Its architecture is the ``vlm`` params stored in the
  source run: ``vlm_experiment_dir`` (a run directory: ``params.json``, else its latest checkpoint), else the
  checkpoint named by ``resume_from_checkpoint`` (run, ``checkpoints/`` or ``checkpoints/<step>`` directory; the
  original's ``<exp>/checkpoints/checkpoint_k.pt``). Weights come from ``resume_from_checkpoint`` only (as the
  original: with just ``vlm_experiment_dir`` the VLM starts random, for fine-tuning a whole policy checkpoint), loaded
  by the registered resume loader before the action row is re-meaned. A source run holding another model type is an
  error naming it. Images of another size than the ViT's are resized bilinearly (half-pixel centres, no antialias:
  torch's ``align_corners=False``) in float32 and cast back. The from-scratch ``transformer`` ignores the padding mask
  when causal, so there (as in the original) the action token also attends to pad tokens.
  Resuming a policy checkpoint rebuilds the same ``V + 1`` tables from the source run's params (no double growth);
  the source run must still exist to rebuild the architecture.

Parameters the backbone never reads get no gradient; torch's AdamW skips them, an optax AdamW would decay them, so
the frozen-paths hook keeps them out of the optimizer (as ``clip_backbone`` does): an untied LM head, and for the
from-scratch ``transformer`` its final ``norm`` (hidden states are pre-norm block outputs).
``freeze=True`` freezes the whole backbone (action row included).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.configs.hf_decoder import hf_decoder_config
from vla_foundry_jax.configs.qwen_vl import QwenVLConfig
from vla_foundry_jax.configs.vlm_hf import Idefics3Config, vlm_hf_config
from vla_foundry_jax.convert.vlm_hf_maps import load_vlm_hf_weights
from vla_foundry_jax.layers.dense import trunc_normal
from vla_foundry_jax.models.backbones import as_cameras
from vla_foundry_jax.models.hf_decoder import HFDecoder
from vla_foundry_jax.models.hf_vlm_common import check_image_tokens as check_hf_image_tokens
from vla_foundry_jax.models.idefics3 import Idefics3
from vla_foundry_jax.models.qwen_vl import (
    QwenVL,
    QwenVLInputError,
    check_inputs,
    check_sample_inputs,
    patchify_images,
)
from vla_foundry_jax.models.transformer import Transformer
from vla_foundry_jax.models.vlm import VLM, check_image_tokens, vision_geometry
from vla_foundry_jax.models.vlm_hf import PaliGemma
from vla_foundry_jax.params import ParamsError, TrainExperimentParams, VLMParams, params_from_dict
from vla_foundry_jax.params.model_params import VLMBackboneParams, VLMFoundryBackboneParams
from vla_foundry_jax.registry import ModelRecord, register_model

# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def append_action_token(
    input_ids: jax.Array, attention_mask: jax.Array | None, action_token_id: int
) -> tuple[jax.Array, jax.Array | None]:
    """``input_ids [B, S] -> [B, S + 1]`` with ``action_token_id`` last; ``attention_mask`` gets a trailing 1."""
    ids = jnp.asarray(input_ids)
    B = ids.shape[0]
    ids = jnp.concatenate([ids, jnp.full((B, 1), action_token_id, ids.dtype)], axis=1)
    if attention_mask is None:
        return ids, None
    mask = jnp.asarray(attention_mask)
    return ids, jnp.concatenate([mask, jnp.ones((B, 1), mask.dtype)], axis=1)


def action_features(hidden_states: Sequence[jax.Array], n_layers: int) -> jax.Array:
    """Last-position vectors of the last ``n_layers`` hidden states ``[B, S, H]``, concatenated: ``[B, 1, n * H]``."""
    return jnp.concatenate([h[:, -1] for h in hidden_states[-n_layers:]], axis=-1)[:, None]


def _check_layers(where: str, n: int, available: int, what: str) -> None:
    if not 1 <= n <= available:
        raise ParamsError(
            f"{where}.num_vlm_layers_to_use = {n} but the language model gives {available} hidden states ({what}); "
            f"choose 1 .. {available}."
        )


def _token_table(lm: Any) -> tuple[nnx.Param, nnx.Param | None]:
    """(input embedding ``[V, H]``, untied output head ``[H, V]`` or None) of a ``Transformer`` / ``HFDecoder``."""
    if isinstance(lm, Transformer):
        return lm.embeddings, lm.output
    if isinstance(lm, HFDecoder):
        return lm.embed_tokens, lm.lm_head
    raise TypeError(f"no token table on a {type(lm).__name__}; expected a transformer or an HF decoder.")


def _mean_row(table: jax.Array, n_rows: int) -> jax.Array:
    """Mean of ``table[:n_rows]`` (float32 accumulation) in the table's dtype."""
    return jnp.mean(table[:n_rows].astype(jnp.float32), axis=0).astype(table.dtype)


def grow_token_table(lm: Any, new_column: jax.Array) -> int:
    """Add the action-token row to ``lm`` in place; returns its id (= the old table size ``V``).

    Embedding row ``V`` = mean of rows ``0 .. V-1``; an untied head gets ``new_column [H]`` as column ``V``.
    """
    emb, head = _token_table(lm)
    table = emb[...]
    V = table.shape[0]
    emb.set_value(jnp.concatenate([table, _mean_row(table, V)[None]], axis=0))
    if head is not None:
        w = head[...]
        head.set_value(jnp.concatenate([w, new_column.astype(w.dtype)[:, None]], axis=1))
    lm.vocab_size = V + 1
    if isinstance(lm, Transformer):
        lm.params = lm.params.replace(vocab_size=V + 1)
    else:
        lm.config = dataclasses.replace(lm.config, vocab_size=V + 1)
    return V


def remean_action_row(states: Sequence[Any], name: str, action_token_id: int) -> list[Any]:
    """Set row ``action_token_id`` of the table ``name`` (dotted path in ``states``) to the mean of the rows before."""
    for state in states:
        flat = ckpt_lib.flat_params(state)
        if name in flat:
            table = flat[name]
            new = table.at[action_token_id].set(_mean_row(table, action_token_id))
            return [ckpt_lib.set_flat_params(s, {name: new}) if s is state else s for s in states]
    raise KeyError(f"no parameter {name!r} in the model states.")


# ----------------------------------------------------------------------------------------------------------
# vlm_backbone (HF VLM)


def _initializer_range(params: VLMBackboneParams) -> float:
    cfg = params.hf_config()
    std = getattr(cfg, "initializer_range", None)
    if std is None:
        text = getattr(cfg, "text_config", None)
        std = getattr(text, "initializer_range", None)
    return float(0.02 if std is None else std)


class _ActionTokenProbe:
    """The conditioning call shared by the VLM backbones: append the action token, run the VLM (``super()``) with
    hidden states, read the action token's features (module docstring). Subclasses set ``where``,
    ``action_token_id`` and ``num_vlm_layers_to_use``."""

    def prepare_images(self, pixel_values: jax.Array) -> jax.Array:
        """``[B, N, img, img, 3]`` (or ``[B, img, img, 3]``) -> camera-major ``[B, N, img, img, 3]``."""
        return as_cameras(pixel_values, self.where)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
        attention_mask_images: jax.Array | None = None,
    ) -> jax.Array:
        """Conditioning ``[B, 1, conditioning_dim]``; ``pixel_values [B, N, h, w, 3]`` (module docstring)."""
        del attention_mask_images
        ids, mask = append_action_token(input_ids, attention_mask, self.action_token_id)
        if pixel_values is not None:
            pixel_values = self.prepare_images(pixel_values)
        out = super().__call__(ids, pixel_values, attention_mask=mask, output_hidden_states=True)
        return action_features(out.hidden_states, self.num_vlm_layers_to_use)


class _HFBackboneMixin(_ActionTokenProbe):
    """The action-token probe on top of a ``vlm_hf`` module (PaliGemma / Idefics3); see the module docstring."""

    def __init__(
        self,
        params: VLMBackboneParams,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
    ):
        config = vlm_hf_config(params)
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)
        self.where = params.gin_name
        _check_layers(self.where, params.num_vlm_layers_to_use, config.text.num_layers + 1, "HF: embeddings + L")
        self.num_vlm_layers_to_use = params.num_vlm_layers_to_use
        H = config.text.hidden_size
        column = _initializer_range(params) * jax.random.normal(rngs.params(), (H,), jnp.float32)
        self.action_token_id = grow_token_table(self.language_model, column)
        self.config = dataclasses.replace(config, text=self.language_model.config)

    @property
    def conditioning_dim(self) -> int:
        return self.num_vlm_layers_to_use * self.config.text.hidden_size


class PaliGemmaBackbone(_HFBackboneMixin, PaliGemma):
    """``vlm_backbone`` over a PaliGemma / PaliGemma 2 checkpoint."""


class Idefics3Backbone(_HFBackboneMixin, Idefics3):
    """``vlm_backbone`` over an Idefics3 / SmolVLM checkpoint."""


class QwenVLBackbone(_HFBackboneMixin, QwenVL):
    """``vlm_backbone`` over a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint. Camera images ``[B, N, h, w, 3]``
    (normalised as the checkpoint's processor does, sides multiples of ``patch_size * spatial_merge_size``) are
    patchified in the model as HF's processor does (:func:`~vla_foundry_jax.models.qwen_vl.patchify_images`); flat
    ``pixel_values`` with ``image_grid_thw`` (a Qwen processor's output) are taken as they are, packed
    ``[N, D]`` + ``[n, 3]`` or per sample ``[B, P, D]`` + ``[B, n, 3]`` (the robotics data's layout)."""

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        attention_mask: jax.Array | None = None,
        attention_mask_images: jax.Array | None = None,
        *,
        image_grid_thw: Any = None,
    ) -> jax.Array:
        del attention_mask_images
        ids, mask = append_action_token(input_ids, attention_mask, self.action_token_id)
        if pixel_values is not None and image_grid_thw is None:
            pixel_values, image_grid_thw = patchify_images(as_cameras(pixel_values, self.where), self.config.vision)
        out = QwenVL.__call__(
            self, ids, pixel_values, image_grid_thw=image_grid_thw, attention_mask=mask, output_hidden_states=True
        )
        return action_features(out.hidden_states, self.num_vlm_layers_to_use)


def build_vlm_backbone(
    params: VLMBackboneParams, *, rngs: nnx.Rngs, **kwargs: Any
) -> PaliGemmaBackbone | Idefics3Backbone | QwenVLBackbone:
    """Registry builder for ``type = "vlm_backbone"`` (random weights; the weight loader fills them)."""
    config = vlm_hf_config(params)
    if isinstance(config, QwenVLConfig):
        return QwenVLBackbone(params, rngs=rngs, **kwargs)
    cls = Idefics3Backbone if isinstance(config, Idefics3Config) else PaliGemmaBackbone
    return cls(params, rngs=rngs, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Abstract stand-in for a parameter the HF loader fills (shape, dtype and sharding only)."""

    shape: tuple[int, ...]
    dtype: Any
    sharding: Any

    @property
    def is_fully_addressable(self) -> bool:
        return getattr(self.sharding, "is_fully_addressable", True)


def load_vlm_backbone_weights(params: VLMBackboneParams, states: Sequence[Any], prefix: str) -> list[Any]:
    """Every tensor of ``hf_pretrained`` (``V``-row tables) into the backbone, then the action row (module doc)."""
    if not params.hf_pretrained:
        return list(states)
    V = vlm_hf_config(params).text.vocab_size
    grown: dict[str, tuple[Any, int]] = {}  # name -> (model leaf, vocab axis)
    for state in states:
        for name, leaf in ckpt_lib.flat_params(state).items():
            if name in (prefix + "language_model.embed_tokens", prefix + "language_model.lm_head"):
                grown[name] = (leaf, 0 if name.endswith("embed_tokens") else 1)
    views = {}
    for name, (leaf, axis) in grown.items():
        shape = list(leaf.shape)
        shape[axis] = V
        views[name] = _Slot(tuple(shape), leaf.dtype, getattr(leaf, "sharding", None))
    states = load_vlm_hf_weights(params, [ckpt_lib.set_flat_params(s, views) for s in states], prefix)
    values = {}
    for state in states:
        for name, loaded in ckpt_lib.flat_params(state).items():
            if name not in grown:
                continue
            leaf, axis = grown[name]
            if axis == 0:  # embeddings: the action row is the mean of the loaded rows
                extra = _mean_row(loaded, V)[None]
            else:  # untied head: keep the model's fresh column
                extra = jax.lax.slice_in_dim(leaf, V, V + 1, axis=1).astype(loaded.dtype)
            new = jnp.concatenate([loaded, extra], axis=axis)
            values[name] = jax.device_put(new, leaf.sharding) if hasattr(leaf, "sharding") else new
    return [ckpt_lib.set_flat_params(s, values) for s in states]


def vlm_backbone_frozen_paths(params: VLMBackboneParams) -> list[tuple[str, ...]]:
    """The untied LM head is never read (hidden states only)."""
    return [("language_model", "lm_head")]


def check_vlm_backbone_batch(params: VLMBackboneParams, batch: dict[str, np.ndarray]) -> None:
    """Host-side: each sample holds exactly its images' image tokens (the action token is appended later)."""
    config = vlm_hf_config(params)
    if isinstance(config, QwenVLConfig):
        pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pixels is not None and grid is None:
            pixels = np.asarray(pixels)
            try:
                pixels, grid = patchify_images(as_cameras(pixels, params.gin_name), config.vision)
            except QwenVLInputError as e:
                raise QwenVLInputError(f"{params.gin_name}: {e}") from None
        if grid is not None and np.ndim(pixels) == 3:  # per-sample padded patches (data.qwen_processor)
            check_sample_inputs(config, batch["input_ids"], pixels, grid)
        else:
            check_inputs(config, batch["input_ids"], pixels, grid)
        return
    check_hf_image_tokens(config, batch["input_ids"], batch.get("pixel_values"))


# ----------------------------------------------------------------------------------------------------------
# vlm_foundry_backbone (a vlm run of this project)


def _read_params_json(path: str) -> TrainExperimentParams:
    with open(path) as f:
        return params_from_dict(json.load(f), TrainExperimentParams, family="config")


def source_vlm_params(params: VLMFoundryBackboneParams) -> VLMParams:
    """The ``vlm`` params of the source run (``vlm_experiment_dir``, else ``resume_from_checkpoint``)."""
    return source_vlm_experiment(params).model


def source_vlm_experiment(params: VLMFoundryBackboneParams) -> TrainExperimentParams:
    """The experiment of the source ``vlm`` run (``vlm_experiment_dir``, else ``resume_from_checkpoint``)."""
    where = params.gin_name
    if params.vlm_experiment_dir:
        run = os.path.abspath(os.path.expanduser(params.vlm_experiment_dir))
        field = f"{where}.vlm_experiment_dir = {params.vlm_experiment_dir!r}"
        if os.path.isfile(os.path.join(run, "params.json")):
            exp = _read_params_json(os.path.join(run, "params.json"))
        elif os.path.isdir(run):
            try:
                exp = ckpt_lib.load_experiment_params(run)
            except ckpt_lib.CheckpointError as e:
                raise ParamsError(f"{field}: no params.json and no checkpoint there ({e})") from e
        else:
            raise ParamsError(f"{field} does not exist; give the run directory (output_dir) of a vlm run.")
    elif params.resume_from_checkpoint:
        field = f"{where}.resume_from_checkpoint = {params.resume_from_checkpoint!r}"
        exp = ckpt_lib.load_experiment_params(params.resume_from_checkpoint)
    else:
        raise ParamsError(
            f"{where} needs {where}.resume_from_checkpoint (a vlm run directory of this project, its checkpoints/ "
            f"or a checkpoints/<step> directory: architecture and weights) or {where}.vlm_experiment_dir "
            f"(architecture only, e.g. when a whole policy checkpoint is restored next)."
        )
    model = exp.model
    if model is None or model.type != "vlm":
        found = None if model is None else model.type
        raise ParamsError(
            f"{field} holds a {found!r} model, not a 'vlm'; vlm_foundry_backbone starts from a VLM trained by this "
            f"project (for a Hugging Face VLM use vlm_backbone with hf_pretrained)."
        )
    return exp


def _lm_width_and_layers(vlm_params: VLMParams) -> tuple[int, int, bool]:
    """(hidden width, hidden-state entries, HF convention?) of the source VLM's language model."""
    t = vlm_params.transformer
    if t.type == "transformer_hf":
        c = hf_decoder_config(t)
        return c.hidden_size, c.num_layers + 1, True
    return t.hidden_dim, t.n_layers, False


class VLMFoundryBackbone(_ActionTokenProbe, VLM):
    """``vlm_foundry_backbone``: the source run's :class:`VLM` with the action-token probe (module docstring)."""

    def __init__(self, params: VLMFoundryBackboneParams, *, rngs: nnx.Rngs, **kwargs: Any):
        vlm_params = source_vlm_params(params)
        super().__init__(vlm_params, rngs=rngs, **kwargs)
        self.where = params.gin_name
        H, available, hf = _lm_width_and_layers(vlm_params)
        what = "HF: embeddings + L" if hf else "the transformer's L block outputs"
        _check_layers(self.where, params.num_vlm_layers_to_use, available, what)
        self.num_vlm_layers_to_use = params.num_vlm_layers_to_use
        self.lm_width = H
        self.image_side = vision_geometry(vlm_params.vit)[0]
        if hf:  # HF's _init_weights
            std = float(getattr(vlm_params.transformer.hf_config(), "initializer_range", None) or 0.02)
            column = std * jax.random.normal(rngs.params(), (H,), jnp.float32)
        else:  # the transformer's own resize init: trunc-normal 1/sqrt(H)
            column = trunc_normal(rngs.params(), (H,), H**-0.5, jnp.float32)
        self.action_token_id = grow_token_table(self.transformer, column)

    @property
    def conditioning_dim(self) -> int:
        return self.num_vlm_layers_to_use * self.lm_width

    def resize_images(self, pixel_values: jax.Array) -> jax.Array:
        """``[B, N, h, w, 3] -> [B, N, s, s, 3]`` (``s`` = the ViT's image side): bilinear, float32, no antialias."""
        s = self.image_side
        if pixel_values.shape[2:4] == (s, s):
            return pixel_values
        shape = (*pixel_values.shape[:2], s, s, pixel_values.shape[-1])
        out = jax.image.resize(pixel_values.astype(jnp.float32), shape, method="bilinear", antialias=False)
        return out.astype(pixel_values.dtype)

    def prepare_images(self, pixel_values: jax.Array) -> jax.Array:
        """Camera-major images resized to the ViT's side (:meth:`resize_images`)."""
        return self.resize_images(as_cameras(pixel_values, self.where))


def build_vlm_foundry_backbone(
    params: VLMFoundryBackboneParams, *, rngs: nnx.Rngs, **kwargs: Any
) -> VLMFoundryBackbone:
    """Registry builder for ``type = "vlm_foundry_backbone"`` (random weights; the resume loader fills them)."""
    return VLMFoundryBackbone(params, rngs=rngs, **kwargs)


def _embedding_name(vlm_params: VLMParams) -> str:
    return "transformer.embed_tokens" if vlm_params.transformer.type == "transformer_hf" else "transformer.embeddings"


def load_source_vlm(params: VLMFoundryBackboneParams, states: Sequence[Any], prefix: str) -> list[Any]:
    """The source VLM's weights (``resume_from_checkpoint``, strict) into the backbone, then the action row."""
    vlm_params = source_vlm_params(params)
    logging.info("loading the %s VLM weights from %s", prefix[:-1] or params.gin_name, params.resume_from_checkpoint)
    states = ckpt_lib.restore_model_weights(
        params.resume_from_checkpoint, states, target_prefix=prefix, grow_vocab=True
    )
    name = prefix + _embedding_name(vlm_params)
    emb = next(ckpt_lib.flat_params(s)[name] for s in states if name in ckpt_lib.flat_params(s))
    return remean_action_row(states, name, emb.shape[0] - 1)


def warn_without_weights(params: VLMFoundryBackboneParams, states: Sequence[Any], prefix: str) -> list[Any]:
    """No weights of its own: they come from ``resume_from_checkpoint`` (resume loader); warn when it is unset."""
    if not params.resume_from_checkpoint:
        logging.warning(
            "%s has no resume_from_checkpoint: the VLM of %s starts from random weights (fine when a whole policy "
            "checkpoint is restored next).",
            params.gin_name,
            params.vlm_experiment_dir,
        )
    return list(states)


def vlm_foundry_frozen_paths(params: VLMFoundryBackboneParams) -> list[tuple[str, ...]]:
    """Never-read parameters: the untied head; the ``transformer``'s final norm (its hidden states are pre-norm)."""
    if source_vlm_params(params).transformer.type == "transformer_hf":
        return [("transformer", "lm_head")]
    return [("transformer", "output"), ("transformer", "norm")]


def check_vlm_foundry_batch(params: VLMFoundryBackboneParams, batch: dict[str, np.ndarray]) -> None:
    """Host-side: each sample holds exactly its images' image tokens of the source VLM."""
    check_image_tokens(source_vlm_params(params), batch["input_ids"], batch.get("pixel_values"))


register_model(
    ModelRecord(
        params=VLMBackboneParams,
        builder=build_vlm_backbone,
        weight_loader=load_vlm_backbone_weights,
        batch_check=check_vlm_backbone_batch,
        frozen_paths=vlm_backbone_frozen_paths,
    )
)
register_model(
    ModelRecord(
        params=VLMFoundryBackboneParams,
        builder=build_vlm_foundry_backbone,
        weight_loader=warn_without_weights,
        batch_check=check_vlm_foundry_batch,
        frozen_paths=vlm_foundry_frozen_paths,
        resume_loader=load_source_vlm,
    )
)
