"""Strict weight loader for ``vlm_hf`` (PaliGemma / PaliGemma 2) from the existing Rule tables, with prefixes.

(Idefics3 / SmolVLM checkpoints take their tables from :mod:`~vla_foundry_jax.convert.idefics3_maps`; the pass below
is the same.)

One strict :func:`~vla_foundry_jax.convert.hf_vision_maps.load_by_rules` pass over three tables:

* ``vision_tower.*`` <- :func:`~vla_foundry_jax.convert.hf_vision_maps.vision_rules` (SigLIP), from the checkpoint's
  vision prefix; SigLIP's attention-pooling ``head.*`` (unused by PaliGemma) is skipped;
* ``multi_modal_projector.{kernel,bias}`` <- ``multi_modal_projector.linear.{weight (transposed),bias}``;
* ``language_model.*`` <- :data:`~vla_foundry_jax.convert.hf_decoder_maps.ARCH_MAPS` (``gemma`` / ``gemma2``),
  from the text model's prefix; ``lm_head.weight`` only when untied (a stored copy of tied embeddings is skipped).
  Gemma's ``1 + w`` RMSNorm weights are read as is by that pass, then rewritten with the ``+ 1`` folded in (float32,
  before the cast to the parameter dtype, as the ``transformer_hf`` loader does; the norms are tiny).

Checkpoint prefixes are detected, so both layouts load: ``save_pretrained`` of transformers 5.x and the hub's
PaliGemma checkpoints (``vision_tower[.vision_model].``, ``multi_modal_projector.``, ``language_model.model.``,
``lm_head`` or ``language_model.lm_head``) and the in-memory names (``model.vision_tower.vision_model.``,
``model.multi_modal_projector.``, ``model.language_model.``, ``lm_head``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.convert.hf_decoder_maps import ARCH_MAPS, Rule, _active, _convert, _place
from vla_foundry_jax.convert.hf_loader import HFLoadError, SafetensorsReader, resolve_hf_path
from vla_foundry_jax.convert.hf_vision_maps import LayeredRule, load_by_rules, vision_rules
from vla_foundry_jax.convert.idefics3_maps import idefics3_rules
from vla_foundry_jax.models.idefics3 import Idefics3Config
from vla_foundry_jax.models.vlm_hf import PaliGemmaConfig, vlm_hf_config

VISION_PREFIXES = (
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.",
)
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def _find(keys: set[str], prefixes: Sequence[str], anchor: str, what: str) -> str:
    for p in prefixes:
        if p + anchor in keys:
            return p
    raise HFLoadError(f"no {what} in the checkpoint (looked for {', '.join(p + anchor for p in prefixes)}).")


def paligemma_rules(c: PaliGemmaConfig, keys: Sequence[str]) -> tuple[list[LayeredRule], list[LayeredRule], set[str]]:
    """(all rules, the Gemma norm rules among them, checkpoint names to skip) for the checkpoint's ``keys``."""
    ks = set(keys)
    vsrc = _find(ks, VISION_PREFIXES, "embeddings.patch_embedding.weight", "SigLIP vision tower")
    psrc = _find(ks, PROJECTOR_PREFIXES, "linear.weight", "multi-modal projector")
    tsrc = _find(ks, TEXT_PREFIXES, "embed_tokens.weight", "language model")
    heads = [k for k in LM_HEADS if k in ks]
    rules = vision_rules(c.vision, "vision_tower.", vsrc)
    rules += [
        (Rule("multi_modal_projector.kernel", psrc + "linear.weight", "T"), None),
        (Rule("multi_modal_projector.bias", psrc + "linear.bias"), None),
    ]
    norms = []
    for r in ARCH_MAPS[c.text.model_type]:
        if not _active(r, c.text):
            continue
        if not r.body:  # the untied lm_head
            if not heads:
                raise HFLoadError(f"the text config is untied but the checkpoint has none of {', '.join(LM_HEADS)}.")
            hf = heads[0]
        else:
            hf = tsrc + r.hf
        layered = (
            Rule("language_model." + r.flax, hf, "copy" if r.transform == "norm" else r.transform),
            c.text.num_layers if "{i}" in r.hf else None,
        )
        rules.append(layered)
        if r.transform == "norm":
            norms.append(layered)
    skip = {k for k in ks if k.startswith(vsrc + "head.") or k.endswith("rotary_emb.inv_freq")}
    if c.text.tie_word_embeddings:
        skip |= set(heads)
    return rules, norms, skip


def load_vlm_hf_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``vlm_hf``: every PaliGemma / Idefics3 tensor of ``hf_pretrained`` into the built model."""
    if not params.hf_pretrained:
        return list(states)
    c = vlm_hf_config(params)
    path = resolve_hf_path(params.hf_pretrained)
    with SafetensorsReader(path) as reader:
        make_rules = idefics3_rules if isinstance(c, Idefics3Config) else paligemma_rules
        rules, norms, skip = make_rules(c, reader.keys())
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    states = load_by_rules(path, rules, states, prefix, ignore=skip.__contains__, where=where)
    if not c.text.norm_offset:
        return states
    leaves = {}
    for state in states:
        leaves.update(ckpt_lib.flat_params(state))
    values = {}
    norm_rule = Rule("", "", "norm")
    with SafetensorsReader(path) as reader:
        for rule, n_layers in norms:
            name = prefix + rule.flax
            raw = [reader.get(rule.hf.format(i=i)) for i in range(n_layers)] if n_layers else reader.get(rule.hf)
            values[name] = _place(_convert(norm_rule, np.asarray(raw), c.text), leaves[name])
    return [ckpt_lib.set_flat_params(state, values) for state in states]
