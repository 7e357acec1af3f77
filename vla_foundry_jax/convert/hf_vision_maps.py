"""Declarative HF-safetensors maps and strict weight loaders for ``vit_hf`` (SigLIP / CLIP vision) and ``clip_hf``.

Each :class:`~vla_foundry_jax.convert.hf_decoder_maps.Rule` maps an HF tensor name to a Flax path (relative to the
model) with a transform: ``"copy"``; ``"T"`` (torch Linear ``[out, in]`` -> kernel ``[in, out]``); ``"conv"`` (the
patch ``Conv2d`` weight ``[D, 3, p, p]`` -> kernel ``[p*p*3, D]`` in the (row, col, channel) patch order of
:meth:`~vla_foundry_jax.models.hf_vision.HFVisionTower.patchify`). ``{i}`` in a name: one tensor per layer, stacked
on the leading ``layers`` axis (:func:`vision_rules` / :func:`text_rules` pair each rule with its layer count).

Which checkpoint tensors are read:

* ``vit_hf``: the vision tower of a ``SiglipVisionModel`` / ``CLIPVisionModel`` checkpoint (names without prefix,
  or under ``vision_model.`` as older exports and full ``SiglipModel`` / ``CLIPModel`` checkpoints store them).
  Knowingly skipped: everything outside the vision tower in a full checkpoint (text tower, projections,
  ``logit_scale`` / ``logit_bias``) and SigLIP's attention-pooling ``head.*``, which ``vit_hf`` does not build;
* ``clip_hf``: every tensor of a ``CLIPModel`` checkpoint.

Stale ``position_ids`` buffers are ignored. Strict otherwise: every other HF tensor consumed, every Flax parameter
under the prefix filled, every shape equal; else :class:`~vla_foundry_jax.convert.hf_loader.HFLoadError` lists the
missing, unexpected and mismatched names. Each converted tensor takes the parameter's dtype and is placed straight
into the target leaf's sharding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.convert.hf_decoder_maps import Rule, _place, mismatch_error
from vla_foundry_jax.convert.hf_loader import HFLoadError, SafetensorsReader, resolve_hf_path
from vla_foundry_jax.models.clip import clip_config
from vla_foundry_jax.models.hf_vision import EncoderConfig, HFVisionConfig, hf_vision_config

LayeredRule = tuple[Rule, int | None]  # (rule, number of stacked layers or None)
IGNORED_SUFFIXES = ("position_ids",)


def encoder_rules(flax: str, hf: str, c: EncoderConfig) -> list[LayeredRule]:
    """An HF ``encoder.layers.{i}`` stack at HF prefix ``hf`` -> our stacked ``encoder.layers`` at ``flax``."""
    f, h = flax + "encoder.layers.", hf + "encoder.layers.{i}."
    names = [f"layer_norm{n}.{w}" for n in (1, 2) for w in ("weight", "bias")]
    rules = [Rule(f + n, h + n) for n in names]
    for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        rules += [Rule(f"{f}{lin}.kernel", f"{h}{lin}.weight", "T"), Rule(f"{f}{lin}.bias", f"{h}{lin}.bias")]
    return [(r, c.num_layers) for r in rules]


def _norm(flax: str, hf: str) -> list[LayeredRule]:
    return [(Rule(f"{flax}.{w}", f"{hf}.{w}"), None) for w in ("weight", "bias")]


def vision_rules(c: HFVisionConfig, flax: str = "", hf: str = "") -> list[LayeredRule]:
    """The SigLIP / CLIP vision tower at Flax prefix ``flax`` from HF prefix ``hf`` (e.g. ``"vision_model."``)."""
    e, he = flax + "embeddings.", hf + "embeddings."
    rules: list[LayeredRule] = [
        (Rule(e + "patch_embedding.kernel", he + "patch_embedding.weight", "conv"), None),
        (Rule(e + "position_embedding", he + "position_embedding.weight"), None),
    ]
    if c.cls_token:
        rules += [(Rule(e + "class_embedding", he + "class_embedding"), None)]
        rules += _norm(flax + "pre_layrnorm", hf + "pre_layrnorm")
    else:
        rules += [(Rule(e + "patch_embedding.bias", he + "patch_embedding.bias"), None)]
    return rules + encoder_rules(flax, hf, c) + _norm(flax + "post_layernorm", hf + "post_layernorm")


def text_rules(c: EncoderConfig, flax: str = "text_model.", hf: str = "text_model.") -> list[LayeredRule]:
    e, he = flax + "embeddings.", hf + "embeddings."
    rules: list[LayeredRule] = [
        (Rule(e + "token_embedding", he + "token_embedding.weight"), None),
        (Rule(e + "position_embedding", he + "position_embedding.weight"), None),
    ]
    return rules + encoder_rules(flax, hf, c) + _norm(flax + "final_layer_norm", hf + "final_layer_norm")


def clip_rules(c: Any) -> list[LayeredRule]:
    """A whole HF ``CLIPModel`` (:class:`~vla_foundry_jax.models.clip.CLIPConfig` ``c``)."""
    return [
        *text_rules(c.text),
        *vision_rules(c.vision, "vision_model.", "vision_model."),
        (Rule("text_projection.kernel", "text_projection.weight", "T"), None),
        (Rule("visual_projection.kernel", "visual_projection.weight", "T"), None),
        (Rule("logit_scale", "logit_scale"), None),
    ]


def _hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint tensor shape a (per-layer) Flax parameter shape comes from (HF and timm transforms)."""
    tr = rule.transform
    if tr == "T":
        return tuple(reversed(shape))
    if tr == "conv":
        p = math.isqrt(shape[0] // 3)
        return (shape[1], 3, p, p)
    if tr == "reshape":  # timm's [1, 1, D] tokens / [1, N, D] position tables
        return (1, 1, *shape) if len(shape) == 1 else (1, *shape)
    if tr.startswith("third"):  # one of q / k / v in timm's fused qkv
        return (3 * shape[1], shape[0]) if tr.endswith("T") else (3 * shape[0],)
    return tuple(shape)


def _convert(rule: Rule, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    tr = rule.transform
    if tr == "T":
        return value.T
    if tr == "conv":  # [D, 3, p, p] -> [p (row), p (col), 3, D] -> [p*p*3, D], HFVisionTower.patchify's order
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    if tr == "reshape":
        return value.reshape(shape)
    if tr.startswith("third"):
        j, n = int(tr[5]), value.shape[0] // 3
        part = value[j * n : (j + 1) * n]
        return part.T if tr.endswith("T") else part
    return value


def load_by_rules(
    path: str,
    rules: Sequence[LayeredRule],
    states: Sequence[Any],
    prefix: str = "",
    *,
    ignore: Callable[[str], bool] = lambda name: False,
    where: str = "hf_pretrained",
) -> list[Any]:
    """Fill the parameters under ``prefix`` in ``states`` from the checkpoint at ``path`` following ``rules``.

    ``ignore(name)`` marks checkpoint tensors that may stay unused; any other unused tensor, unfilled parameter or
    shape difference raises :class:`HFLoadError`.
    """
    targets: dict[str, Any] = {}
    for state in states:
        for name, leaf in ckpt_lib.flat_params(state).items():
            if name.startswith(prefix):
                targets[name[len(prefix) :]] = leaf
    with SafetensorsReader(path) as reader:
        keys = reader.keys()
        expected: dict[str, tuple[int, ...] | None] = {}
        for rule, n_layers in rules:
            leaf = targets.get(rule.flax)
            want = None if leaf is None else _hf_shape(rule, tuple(leaf.shape[1:] if n_layers else leaf.shape))
            for i in range(n_layers) if n_layers else [None]:
                expected[rule.hf.format(i=i)] = want
        unmapped = sorted(set(targets) - {r.flax for r, _ in rules})
        unmapped += [f"(rule without parameter) {r.flax}" for r, _ in rules if r.flax not in targets]
        missing = sorted(set(expected) - set(keys))
        unexpected = sorted(k for k in set(keys) - set(expected) if not (k.endswith(IGNORED_SUFFIXES) or ignore(k)))
        mismatched = [
            f"{k}: checkpoint {reader.shape(k)} vs model {want}"
            for k, want in sorted(expected.items())
            if k in reader.files and want is not None and reader.shape(k) != want
        ]
        if missing or unexpected or mismatched or unmapped:
            raise mismatch_error(where, missing, unexpected, mismatched, unmapped)

        cached: tuple[str, np.ndarray] | None = None  # a fused tensor (timm's qkv) serves several rules in a row

        def read(name: str) -> np.ndarray:
            nonlocal cached
            if cached is None or cached[0] != name:
                cached = (name, reader.get(name))
            return cached[1]

        values = {}
        for rule, n_layers in rules:
            leaf = targets[rule.flax]
            shape = tuple(leaf.shape[1:] if n_layers else leaf.shape)
            if n_layers:
                value = np.stack([_convert(rule, read(rule.hf.format(i=i)), shape) for i in range(n_layers)])
            else:
                value = _convert(rule, read(rule.hf), shape)
            values[prefix + rule.flax] = _place(np.asarray(value, order="C"), leaf)
    return [ckpt_lib.set_flat_params(state, values) for state in states]


def vision_source_prefix(keys: Sequence[str]) -> str:
    """``"vision_model."`` or ``""``: where the vision tower's tensors live in a checkpoint."""
    for src in ("", "vision_model."):
        if src + "embeddings.patch_embedding.weight" in keys:
            return src
    raise HFLoadError(
        "no vision tower in the checkpoint (neither embeddings.patch_embedding.weight nor "
        "vision_model.embeddings.patch_embedding.weight)."
    )


def load_vit_hf_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``vit_hf``: the vision tower of ``hf_pretrained`` into the built model."""
    if not params.hf_pretrained:
        return list(states)
    path = resolve_hf_path(params.hf_pretrained)
    from vla_foundry_jax.convert import timm_vit_maps

    if timm_vit_maps.is_timm_checkpoint(path):  # timm's format (the original's vit_hf): its own key map
        return timm_vit_maps.load_vit_hf_timm_weights(params, states, prefix)
    with SafetensorsReader(path) as reader:
        src = vision_source_prefix(reader.keys())

    def ignore(name: str) -> bool:  # the rest of a full checkpoint; SigLIP's pooling head
        return not name.startswith(src) or name.startswith(src + "head.")

    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    rules = vision_rules(hf_vision_config(params), "", src)
    return load_by_rules(path, rules, states, prefix, ignore=ignore, where=where)


def load_clip_hf_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``clip_hf`` / ``clip_backbone``: every tensor of the ``CLIPModel`` checkpoint."""
    if not params.hf_pretrained:
        return list(states)
    path = resolve_hf_path(params.hf_pretrained)
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    return load_by_rules(path, clip_rules(clip_config(params)), states, prefix, where=where)
