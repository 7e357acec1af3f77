"""Declarative HF-safetensors tables and weight loaders for ``vit_hf`` (SigLIP / CLIP vision) and ``clip_hf``.

Each :class:`~vla_foundry_jax.convert.engine.Rule` maps an HF tensor name to a Flax path (relative to the model):
``COPY``; ``TRANSPOSE`` (torch Linear ``[out, in]`` -> kernel ``[in, out]``); ``PATCH_CONV`` (the patch ``Conv2d``
weight ``[D, 3, p, p]`` -> kernel ``[p*p*3, D]`` in the (row, col, channel) patch order of
:meth:`~vla_foundry_jax.models.hf_vision.HFVisionTower.patchify`). ``{i}`` in a name: one tensor per layer, stacked
on the leading ``layers`` axis.

Which checkpoint tensors are read:

* ``vit_hf``: the vision tower of a ``SiglipVisionModel`` / ``CLIPVisionModel`` checkpoint (names without prefix,
  or under ``vision_model.`` as older exports and full ``SiglipModel`` / ``CLIPModel`` checkpoints store them).
  Knowingly skipped: everything outside the vision tower in a full checkpoint (text tower, projections,
  ``logit_scale`` / ``logit_bias``) and SigLIP's attention-pooling ``head.*``, which ``vit_hf`` does not build. A
  timm-format checkpoint goes to :mod:`~vla_foundry_jax.convert.timm_vit_maps`;
* ``clip_hf``: every tensor of a ``CLIPModel`` checkpoint.

Stale ``position_ids`` buffers are ignored. Strict otherwise (:func:`~vla_foundry_jax.convert.engine.load_rules`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.configs.clip import CLIPConfig, clip_config
from vla_foundry_jax.configs.hf_hub import resolve_hf_path
from vla_foundry_jax.configs.hf_vision import EncoderConfig, HFVisionConfig, hf_vision_config, is_timm_checkpoint
from vla_foundry_jax.convert.engine import PATCH_CONV, TRANSPOSE, Rule, find_prefix, load_rules
from vla_foundry_jax.convert.sources import SafetensorsReader
from vla_foundry_jax.convert.timm_vit_maps import load_timm_vit_weights

IGNORED_SUFFIXES = ("position_ids",)
VISION_PREFIXES = ("", "vision_model.")


def encoder_rules(flax: str, hf: str, c: EncoderConfig) -> list[Rule]:
    """An HF ``encoder.layers.{i}`` stack at HF prefix ``hf`` -> our stacked ``encoder.layers`` at ``flax``."""
    f, h, n = flax + "encoder.layers.", hf + "encoder.layers.{i}.", c.num_layers
    rules = [Rule(f + w, h + w, layers=n) for w in (f"layer_norm{k}.{p}" for k in (1, 2) for p in ("weight", "bias"))]
    for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        rules += [
            Rule(f"{f}{lin}.kernel", f"{h}{lin}.weight", TRANSPOSE, layers=n),
            Rule(f"{f}{lin}.bias", f"{h}{lin}.bias", layers=n),
        ]
    return rules


def norm_rules(flax: str, hf: str) -> list[Rule]:
    return [Rule(f"{flax}.{w}", f"{hf}.{w}") for w in ("weight", "bias")]


def vision_rules(c: HFVisionConfig, flax: str = "", hf: str = "") -> list[Rule]:
    """The SigLIP / CLIP vision tower at Flax prefix ``flax`` from HF prefix ``hf`` (e.g. ``"vision_model."``)."""
    e, he = flax + "embeddings.", hf + "embeddings."
    rules = [
        Rule(e + "patch_embedding.kernel", he + "patch_embedding.weight", PATCH_CONV),
        Rule(e + "position_embedding", he + "position_embedding.weight"),
    ]
    if c.cls_token:
        rules += [
            Rule(e + "class_embedding", he + "class_embedding"),
            *norm_rules(flax + "pre_layrnorm", hf + "pre_layrnorm"),
        ]
    else:
        rules += [Rule(e + "patch_embedding.bias", he + "patch_embedding.bias")]
    return rules + encoder_rules(flax, hf, c) + norm_rules(flax + "post_layernorm", hf + "post_layernorm")


def text_rules(c: EncoderConfig, flax: str = "text_model.", hf: str = "text_model.") -> list[Rule]:
    e, he = flax + "embeddings.", hf + "embeddings."
    rules = [
        Rule(e + "token_embedding", he + "token_embedding.weight"),
        Rule(e + "position_embedding", he + "position_embedding.weight"),
    ]
    return rules + encoder_rules(flax, hf, c) + norm_rules(flax + "final_layer_norm", hf + "final_layer_norm")


def clip_rules(c: CLIPConfig) -> list[Rule]:
    """A whole HF ``CLIPModel``."""
    return [
        *text_rules(c.text),
        *vision_rules(c.vision, "vision_model.", "vision_model."),
        Rule("text_projection.kernel", "text_projection.weight", TRANSPOSE),
        Rule("visual_projection.kernel", "visual_projection.weight", TRANSPOSE),
        Rule("logit_scale", "logit_scale"),
    ]


def vision_source_prefix(keys: Sequence[str]) -> str:
    """``"vision_model."`` or ``""``: where the vision tower's tensors live in a checkpoint."""
    return find_prefix(keys, VISION_PREFIXES, "embeddings.patch_embedding.weight", "vision tower")


def _stale(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def load_vit_hf_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``vit_hf``: the vision tower of ``hf_pretrained`` into the built model."""
    if not params.hf_pretrained:
        return list(states)
    path = resolve_hf_path(params.hf_pretrained)
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    if is_timm_checkpoint(path):  # timm's format (the original's vit_hf): its own key map
        return load_timm_vit_weights(path, hf_vision_config(params), states, prefix, where=where)
    with SafetensorsReader(path) as reader:
        src = vision_source_prefix(reader.keys())

        def ignore(name: str) -> bool:  # the rest of a full checkpoint; SigLIP's pooling head
            return _stale(name) or not name.startswith(src) or name.startswith(src + "head.")

        rules = vision_rules(hf_vision_config(params), "", src)
        return load_rules(reader, rules, states, prefix, where=where, ignore=ignore)


def load_clip_hf_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``clip_hf`` / ``clip_backbone``: every tensor of the ``CLIPModel`` checkpoint."""
    if not params.hf_pretrained:
        return list(states)
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    with SafetensorsReader(resolve_hf_path(params.hf_pretrained)) as reader:
        return load_rules(reader, clip_rules(clip_config(params)), states, prefix, where=where, ignore=_stale)
