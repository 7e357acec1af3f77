"""Weight tables and the strict loader of ``vlm_hf``: PaliGemma / PaliGemma 2 and Idefics3 / SmolVLM checkpoints
(Qwen-VL checkpoints: :mod:`~vla_foundry_jax.convert.qwen_vl_maps`).

Each model is three existing tables with prefixes, loaded in one strict
:func:`~vla_foundry_jax.convert.engine.load_rules` pass:

* ``vision_tower.*`` <- :func:`~vla_foundry_jax.convert.hf_vision_maps.vision_rules` (SigLIP layout) from the
  checkpoint's vision prefix; SigLIP's attention-pooling ``head.*`` (unused by PaliGemma) is skipped;
* the projection: PaliGemma's ``multi_modal_projector.{kernel,bias}`` <- ``multi_modal_projector.linear.{weight
  (transposed),bias}``; Idefics3's ``connector.kernel`` <- ``connector.modality_projection.proj.weight``
  (transposed; no bias);
* ``language_model.*`` <- :func:`~vla_foundry_jax.convert.hf_decoder_maps.decoder_rules` of the text config from
  the text model's prefix (Gemma's ``1 + w`` norms folded in as for ``transformer_hf``); ``lm_head.weight`` only
  when untied (a stored copy of tied embeddings is skipped, as are stale ``rotary_emb.inv_freq`` / ``position_ids``
  buffers).

Checkpoint prefixes are detected, so both layouts load. PaliGemma: ``save_pretrained`` of transformers 5.x and the
hub's checkpoints (``vision_tower[.vision_model].``, ``multi_modal_projector.``, ``language_model.model.``,
``lm_head`` or ``language_model.lm_head``) and the in-memory names (``model.vision_tower.vision_model.``,
``model.multi_modal_projector.``, ``model.language_model.``, ``lm_head``). Idefics3: the ``model.``-prefixed names of
``save_pretrained`` and the hub's SmolVLM / Idefics3 checkpoints, and the bare ones (an ``Idefics3Model`` saved on
its own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.configs.hf_hub import HFLoadError, resolve_hf_path
from vla_foundry_jax.configs.qwen_vl import QwenVLConfig
from vla_foundry_jax.configs.vlm_hf import Idefics3Config, PaliGemmaConfig, vlm_hf_config
from vla_foundry_jax.convert import hf_decoder_maps, hf_vision_maps
from vla_foundry_jax.convert.engine import TRANSPOSE, Rule, find_prefix, load_rules, resolve
from vla_foundry_jax.convert.hf_decoder_maps import decoder_rules
from vla_foundry_jax.convert.hf_vision_maps import vision_rules
from vla_foundry_jax.convert.qwen_vl_maps import load_qwen_vl_weights
from vla_foundry_jax.convert.sources import SafetensorsReader

STALE = hf_decoder_maps.IGNORED_SUFFIXES + hf_vision_maps.IGNORED_SUFFIXES  # rotary / position-id buffers
PATCH = "embeddings.patch_embedding.weight"


@dataclasses.dataclass(frozen=True)
class VLMLayout:
    """Where a VLM checkpoint keeps its three parts: candidate prefixes (first match wins) and what each is called
    in errors; the projection's rules (sources relative to its prefix, found by ``projector_anchor``); the
    ``lm_head`` tensors an untied model may use; whether SigLIP's pooling ``head.*`` is skipped."""

    vision: tuple[tuple[str, ...], str]
    projector: tuple[tuple[str, ...], str]
    projector_anchor: str
    projector_rules: tuple[Rule, ...]
    text: tuple[tuple[str, ...], str]
    lm_heads: tuple[str, ...]
    untied_what: str
    skip_pooling_head: bool = False


PALIGEMMA = VLMLayout(
    vision=(
        ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."),
        "SigLIP vision tower",
    ),
    projector=(("multi_modal_projector.", "model.multi_modal_projector."), "multi-modal projector"),
    projector_anchor="linear.weight",
    projector_rules=(
        Rule("multi_modal_projector.kernel", "linear.weight", TRANSPOSE),
        Rule("multi_modal_projector.bias", "linear.bias"),
    ),
    text=(("language_model.model.", "model.language_model.", "language_model."), "language model"),
    lm_heads=("lm_head.weight", "language_model.lm_head.weight"),
    untied_what="text config",
    skip_pooling_head=True,
)
IDEFICS3 = VLMLayout(
    vision=(("model.vision_model.", "vision_model."), "Idefics3 vision model"),
    projector=(("model.connector.", "connector."), "Idefics3 connector"),
    projector_anchor="modality_projection.proj.weight",
    projector_rules=(Rule("connector.kernel", "modality_projection.proj.weight", TRANSPOSE),),
    text=(("model.text_model.", "text_model."), "text model"),
    lm_heads=("lm_head.weight",),
    untied_what="config",
)


def vlm_rules(
    layout: VLMLayout, c: PaliGemmaConfig | Idefics3Config, keys: Sequence[str]
) -> tuple[list[Rule], set[str]]:
    """(rules, checkpoint names to skip) of a VLM checkpoint with tensor names ``keys``."""
    ks = set(keys)
    vsrc = find_prefix(ks, layout.vision[0], PATCH, layout.vision[1])
    psrc = find_prefix(ks, layout.projector[0], layout.projector_anchor, layout.projector[1])
    tsrc = find_prefix(ks, layout.text[0], "embed_tokens.weight", layout.text[1])
    heads = [k for k in layout.lm_heads if k in ks]
    if not c.text.tie_word_embeddings and not heads:
        raise HFLoadError(
            f"the {layout.untied_what} is untied but the checkpoint has none of {', '.join(layout.lm_heads)}."
        )
    rules = vision_rules(c.vision, "vision_tower.", vsrc)
    rules += resolve(layout.projector_rules, source_prefix=psrc)
    rules += decoder_rules(c.text, tsrc, "language_model.", heads[0] if heads else None)
    skip = {k for k in ks if k.endswith(STALE) or (layout.skip_pooling_head and k.startswith(vsrc + "head."))}
    return rules, skip | (set(heads) if c.text.tie_word_embeddings else set())


def load_vlm_hf_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``vlm_hf``: every PaliGemma / Idefics3 tensor of ``hf_pretrained`` into the built model."""
    if not params.hf_pretrained:
        return list(states)
    c = vlm_hf_config(params)
    if isinstance(c, QwenVLConfig):
        return load_qwen_vl_weights(params, c, states, prefix)
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    with SafetensorsReader(resolve_hf_path(params.hf_pretrained)) as reader:
        rules, skip = vlm_rules(IDEFICS3 if isinstance(c, Idefics3Config) else PALIGEMMA, c, reader.keys())
        return load_rules(reader, rules, states, prefix, where=where, ignore=skip.__contains__)
