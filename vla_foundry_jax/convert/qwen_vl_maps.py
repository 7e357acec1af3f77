"""Weight table and strict loader of the Qwen-VL checkpoints (``vlm_hf`` with ``qwen2_vl`` / ``qwen2_5_vl`` /
``qwen3_vl``): HF tensor names -> :class:`~vla_foundry_jax.models.qwen_vl.QwenVL` parameters.

* ``visual.*`` <- the vision tower, from ``model.visual.`` (transformers 5.x in memory, the hub's Qwen3-VL) or
  ``visual.`` (the hub's Qwen2-VL / Qwen2.5-VL and their ``save_pretrained``): the ``Conv3d`` patch embedding
  flattened to a ``[C * T * p * p, D]`` kernel (:func:`patch_embed_transform`), the blocks stacked on a leading
  axis (``{i}``), the per-family MLP and merger names of :data:`MLP_NAMES` / :data:`MERGER_NAMES`, Qwen3-VL's
  ``pos_embed`` and its DeepStack mergers (stacked likewise);
* ``language_model.*`` <- :func:`~vla_foundry_jax.convert.hf_decoder_maps.decoder_rules` of the Qwen2 / Qwen3
  text config from ``model.language_model.`` or ``model.``; ``lm_head.weight`` only when untied (a stored copy of
  tied embeddings is skipped).

One :func:`~vla_foundry_jax.convert.engine.load_rules` pass: every tensor consumed, every parameter filled, every
shape checked before any data is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.configs.hf_hub import HFLoadError, resolve_hf_path
from vla_foundry_jax.configs.qwen_vl import QwenVisionConfig, QwenVLConfig
from vla_foundry_jax.convert import hf_decoder_maps
from vla_foundry_jax.convert.engine import COPY, TRANSPOSE, Rule, Transform, find_prefix, load_rules, resolve
from vla_foundry_jax.convert.hf_decoder_maps import decoder_rules
from vla_foundry_jax.convert.sources import SafetensorsReader

VISION_PREFIXES = ("model.visual.", "visual.")
TEXT_PREFIXES = ("model.language_model.", "model.", "language_model.")
PATCH = "patch_embed.proj.weight"
# our MLP names -> HF's, per family
MLP_NAMES = {
    "qwen2_vl": {"fc1": "fc1", "fc2": "fc2"},
    "qwen2_5_vl": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
    "qwen3_vl": {"fc1": "linear_fc1", "fc2": "linear_fc2"},
}
MERGER_NAMES = {
    "qwen2_vl": {"norm": "ln_q", "fc1": "mlp.0", "fc2": "mlp.2"},
    "qwen2_5_vl": {"norm": "ln_q", "fc1": "mlp.0", "fc2": "mlp.2"},
    "qwen3_vl": {"norm": "norm", "fc1": "linear_fc1", "fc2": "linear_fc2"},
}
_B = "blocks.{i}."


def patch_embed_transform(v: QwenVisionConfig) -> Transform:
    """``Conv3d`` weight ``[D, C, T, p, p]`` -> kernel ``[C * T * p * p, D]`` (the flat pixel row's order)."""
    kernel = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return Transform(
        "patch_embed_3d",
        lambda value, shape: value.reshape(value.shape[0], -1).T,
        lambda shape: (shape[1], *kernel),
        invert=lambda value: value.T.reshape(value.shape[1], *kernel),
    )


def vision_table(v: QwenVisionConfig) -> list[Rule]:
    """The vision tower's rules (sources relative to the tower's prefix, targets relative to ``visual.``)."""
    layer_norm = v.family != "qwen2_5_vl"  # LayerNorms carry a bias; Qwen2.5-VL's RMSNorms do not
    rules = [Rule("patch_embed.kernel", PATCH, patch_embed_transform(v))]
    if v.family == "qwen3_vl":
        rules += [Rule("patch_embed.bias", "patch_embed.proj.bias"), Rule("pos_embed", "pos_embed.weight")]
    for n in ("norm1", "norm2"):
        rules.append(Rule(f"blocks.{n}.weight", _B + f"{n}.weight"))
        if layer_norm:
            rules.append(Rule(f"blocks.{n}.bias", _B + f"{n}.bias"))
    for p in ("qkv", "proj"):
        rules += [
            Rule(f"blocks.attn.{p}.kernel", _B + f"attn.{p}.weight", TRANSPOSE),
            Rule(f"blocks.attn.{p}.bias", _B + f"attn.{p}.bias"),
        ]
    for ours, theirs in MLP_NAMES[v.family].items():
        rules += [
            Rule(f"blocks.mlp.{ours}.kernel", _B + f"mlp.{theirs}.weight", TRANSPOSE),
            Rule(f"blocks.mlp.{ours}.bias", _B + f"mlp.{theirs}.bias"),
        ]

    def merger(target: str, source: str) -> list[Rule]:
        names = MERGER_NAMES[v.family]
        out = [Rule(f"{target}.norm.weight", f"{source}.{names['norm']}.weight")]
        if layer_norm:
            out.append(Rule(f"{target}.norm.bias", f"{source}.{names['norm']}.bias"))
        for p in ("fc1", "fc2"):
            out += [
                Rule(f"{target}.{p}.kernel", f"{source}.{names[p]}.weight", TRANSPOSE),
                Rule(f"{target}.{p}.bias", f"{source}.{names[p]}.bias", COPY),
            ]
        return out

    rules += merger("merger", "merger")
    rules = resolve(rules, layers=v.depth)
    if v.deepstack_visual_indexes:
        deep = merger("deepstack_mergers", "deepstack_merger_list.{i}")
        rules += resolve(deep, layers=len(v.deepstack_visual_indexes))
    return rules


def qwen_vl_rules(c: QwenVLConfig, keys: Sequence[str]) -> tuple[list[Rule], set[str]]:
    """(rules, checkpoint names to skip) of a Qwen-VL checkpoint with tensor names ``keys``."""
    ks = set(keys)
    vsrc = find_prefix(ks, VISION_PREFIXES, PATCH, f"{c.model_type} vision tower")
    tsrc = find_prefix(ks, TEXT_PREFIXES, "embed_tokens.weight", f"{c.model_type} language model")
    if not c.text.tie_word_embeddings and "lm_head.weight" not in ks:
        raise HFLoadError(f"the {c.model_type} config is untied but the checkpoint has no lm_head.weight.")
    rules = resolve(vision_table(c.vision), source_prefix=vsrc, target_prefix="visual.")
    rules += decoder_rules(c.text, tsrc, "language_model.", None if c.text.tie_word_embeddings else "lm_head.weight")
    skip = {k for k in ks if k.endswith(hf_decoder_maps.IGNORED_SUFFIXES)}
    if c.text.tie_word_embeddings:
        skip.add("lm_head.weight")
    return rules, skip


def load_qwen_vl_weights(params: Any, config: QwenVLConfig, states: Sequence[Any], prefix: str) -> list[Any]:
    """Every tensor of the ``hf_pretrained`` Qwen-VL checkpoint into the built model (strict)."""
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    with SafetensorsReader(resolve_hf_path(params.hf_pretrained)) as reader:
        rules, skip = qwen_vl_rules(config, reader.keys())
        return load_rules(reader, rules, states, prefix, where=where, ignore=skip.__contains__)
