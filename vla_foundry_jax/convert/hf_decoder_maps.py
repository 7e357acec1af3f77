"""Declarative HF-safetensors -> ``transformer_hf`` parameter maps and the strict loader (registered weight loader).

One table per architecture (:data:`ARCH_MAPS`): each :class:`Rule` maps an HF tensor name pattern to a Flax path
(relative to the model) with a transform:

* ``"copy"``: as is; ``"T"``: transpose ``[out, in] -> [in, out]`` (torch Linear weights to our kernels);
* ``"norm"``: RMSNorm weight; Gemma's norms (``x * (1 + w)``) get ``+ 1`` folded in;
* ``{i}`` in the pattern: one HF tensor per layer, stacked on a leading ``layers`` axis.

A rule's ``when`` names an :class:`~vla_foundry_jax.models.hf_decoder.HFDecoderConfig` flag that must hold (e.g.
``"qkv_bias"``, ``"untied"``). HF names may carry a ``model.`` prefix (``*ForCausalLM`` checkpoints) or not (bare
``*Model``). ``lm_head.weight`` stored next to tied embeddings is ignored (HF ties it too), as are stale
``rotary_emb.inv_freq`` buffers.

Strict: every HF tensor consumed, every Flax parameter under the prefix filled, every shape equal; otherwise
:class:`~vla_foundry_jax.convert.hf_loader.HFLoadError` lists the missing, unexpected and mismatched names. Each
converted tensor is cast to the parameter's dtype and placed straight into the target leaf's sharding; a stacked one
is assembled layer by layer into one host buffer of the parameter's dtype (no ``np.stack`` copy), so host memory
peaks near one stacked tensor plus one layer's tensor above the placed parameters.

A directory holding :data:`CONFIG_ONLY_MARKER` (``<run>/hf_config`` of a run made by ``launch.convert_hf``) has a
config but no tensors: the loader then leaves the parameters to ``resume_from_checkpoint`` (and says so if unset).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.convert.hf_loader import (
    HOST_ALIGNMENT,
    HFLoadError,
    SafetensorsReader,
    aligned_empty,
    resolve_hf_path,
)
from vla_foundry_jax.models.hf_decoder import HFDecoderConfig, hf_decoder_config


@dataclasses.dataclass(frozen=True)
class Rule:
    flax: str
    hf: str
    transform: str = "copy"  # "copy" | "T" | "norm"
    when: str | None = None  # HFDecoderConfig flag (or "untied") that must be true
    body: bool = True  # under the decoder body (``model.`` in ``*ForCausalLM`` checkpoints); False: lm_head


_LAYER = "layers.{i}."
BASE = (
    Rule("embed_tokens", "embed_tokens.weight"),
    Rule("layers.input_layernorm.scale", _LAYER + "input_layernorm.weight", "norm"),
    Rule("layers.self_attn.q_proj.kernel", _LAYER + "self_attn.q_proj.weight", "T"),
    Rule("layers.self_attn.k_proj.kernel", _LAYER + "self_attn.k_proj.weight", "T"),
    Rule("layers.self_attn.v_proj.kernel", _LAYER + "self_attn.v_proj.weight", "T"),
    Rule("layers.self_attn.o_proj.kernel", _LAYER + "self_attn.o_proj.weight", "T"),
    Rule("layers.post_attention_layernorm.scale", _LAYER + "post_attention_layernorm.weight", "norm"),
    Rule("layers.mlp.gate_proj.kernel", _LAYER + "mlp.gate_proj.weight", "T"),
    Rule("layers.mlp.up_proj.kernel", _LAYER + "mlp.up_proj.weight", "T"),
    Rule("layers.mlp.down_proj.kernel", _LAYER + "mlp.down_proj.weight", "T"),
    Rule("norm.scale", "norm.weight", "norm"),
    Rule("lm_head", "lm_head.weight", "T", when="untied", body=False),
)
QKV_BIAS = tuple(
    Rule(f"layers.self_attn.{p}_proj.bias", _LAYER + f"self_attn.{p}_proj.bias", when="qkv_bias") for p in "qkv"
)
O_BIAS = (Rule("layers.self_attn.o_proj.bias", _LAYER + "self_attn.o_proj.bias", when="o_bias"),)
MLP_BIAS = tuple(
    Rule(f"layers.mlp.{p}_proj.bias", _LAYER + f"mlp.{p}_proj.bias", when="mlp_bias") for p in ("gate", "up", "down")
)
QK_NORM = tuple(Rule(f"layers.self_attn.{p}_norm.scale", _LAYER + f"self_attn.{p}_norm.weight", "norm") for p in "qk")
SANDWICH = tuple(
    Rule(f"layers.{n}.scale", _LAYER + f"{n}.weight", "norm")
    for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
)

ARCH_MAPS: dict[str, tuple[Rule, ...]] = {
    "llama": BASE + QKV_BIAS + O_BIAS + MLP_BIAS,
    "qwen2": BASE + QKV_BIAS,
    "qwen3": BASE + QKV_BIAS + O_BIAS + QK_NORM,
    "mistral": BASE,
    "gemma": BASE + QKV_BIAS + O_BIAS,
    "gemma2": BASE + QKV_BIAS + O_BIAS + SANDWICH,
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Written by ``launch.convert_hf`` into ``<run>/hf_config/``: a config (and tokenizer) directory without weights;
# the weights live in the run's Orbax checkpoint and are loaded through ``resume_from_checkpoint``.
CONFIG_ONLY_MARKER = "converted_run.json"


def _active(rule: Rule, c: HFDecoderConfig) -> bool:
    if rule.when is None:
        return True
    if rule.when == "untied":
        return not c.tie_word_embeddings
    return bool(getattr(c, rule.when))


def _convert(rule: Rule, value: np.ndarray, c: HFDecoderConfig) -> np.ndarray:
    if rule.transform == "T":
        return value.T
    if rule.transform == "norm" and c.norm_offset:
        return value.astype(np.float32) + np.float32(1.0)
    return value


def _hf_shape(rule: Rule, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape a (per-layer) Flax shape corresponds to."""
    return tuple(reversed(flax_shape)) if rule.transform == "T" else tuple(flax_shape)


def _host_buffer(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``value`` as a C-contiguous, :data:`HOST_ALIGNMENT`-aligned array of ``dtype``: itself when it already is
    one, otherwise one converting copy (no intermediate ``astype`` / ``ascontiguousarray`` copy)."""
    if (
        value.dtype == dtype
        and value.flags.c_contiguous
        and value.flags.writeable
        and value.ctypes.data % HOST_ALIGNMENT == 0
    ):
        return value
    out = aligned_empty(value.shape, dtype)
    np.copyto(out, value, casting="unsafe")
    return out


def _place(value: np.ndarray, leaf: Any) -> jax.Array:
    """``value`` with ``leaf``'s dtype, placed in ``leaf``'s sharding (each process supplies its own shards).

    On the CPU backend a single-device placement aliases the (aligned) host buffer instead of copying it, so the
    caller must not write to ``value`` afterwards; ``value`` is the caller's own freshly read / converted buffer.
    """
    dtype = np.dtype(leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and not getattr(leaf, "is_fully_addressable", True):
        value = np.asarray(value).astype(dtype, copy=False)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    value = _host_buffer(np.asarray(value), dtype)
    return jax.device_put(value, jax.local_devices()[0] if sharding is None else sharding)


def _hf_name(rule: Rule, src: str, i: int | None = None) -> str:
    return (src if rule.body else "") + rule.hf.format(i=i)


def _source_prefix(keys: list[str]) -> str:
    return "model." if any(k.startswith("model.embed_tokens.") for k in keys) else ""


def mismatch_error(
    where: str, missing: list[str], unexpected: list[str], mismatched: list[str], unmapped: list[str]
) -> HFLoadError:
    """The strict-load error: what is mis-shaped, missing, unused or unfilled (20 names of each at most)."""
    lines = [f"{where} does not match the model built from its config:"]
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:20]))
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
    if unexpected:
        lines.append(
            f"  in the checkpoint but not used by the model ({len(unexpected)}): " + ", ".join(unexpected[:20])
        )
    if unmapped:
        lines.append(f"  model parameters no rule fills ({len(unmapped)}): " + ", ".join(unmapped[:20]))
    if mismatched or missing or unexpected:
        lines.append("  Is config.json the one these tensors were saved with?")
    return HFLoadError("\n".join(lines))


def load_hf_decoder_weights(
    path: str, config: HFDecoderConfig, states: Sequence[Any], prefix: str = "", source: str | None = None
) -> list[Any]:
    """Fill the ``transformer_hf`` parameters under ``prefix`` in ``states`` from the HF checkpoint directory."""
    targets: dict[str, Any] = {}
    for state in states:
        for name, leaf in ckpt_lib.flat_params(state).items():
            if name.startswith(prefix):
                targets[name[len(prefix) :]] = leaf
    if "embed_tokens" not in targets:
        raise HFLoadError(f"no transformer_hf parameters under the module path {prefix!r}.")
    rules = [r for r in ARCH_MAPS[config.model_type] if _active(r, config)]
    L = config.num_layers
    source = source or path
    with SafetensorsReader(path) as reader:
        keys = reader.keys()
        src = _source_prefix(keys)
        expected: dict[str, tuple[Rule, tuple[int, ...] | None]] = {}
        unmapped = sorted(set(targets) - {r.flax for r in rules})
        for rule in rules:
            leaf = targets.get(rule.flax)
            stacked = "{i}" in rule.hf
            want = None if leaf is None else _hf_shape(rule, tuple(leaf.shape[1:] if stacked else leaf.shape))
            for i in range(L) if stacked else [None]:
                expected[_hf_name(rule, src, i)] = (rule, want)
        if leaf_less := sorted(r.flax for r in rules if r.flax not in targets):
            unmapped += [f"(rule without parameter) {n}" for n in leaf_less]
        ignorable = {k for k in keys if k.endswith(IGNORED_SUFFIXES)}
        if config.tie_word_embeddings:
            ignorable |= {k for k in keys if k == "lm_head.weight"}
        missing = sorted(set(expected) - set(keys))
        unexpected = sorted(set(keys) - set(expected) - ignorable)
        mismatched = [
            f"{k}: checkpoint {reader.shape(k)} vs model {want}"
            for k, (_, want) in sorted(expected.items())
            if k in reader.files and want is not None and reader.shape(k) != want
        ]
        if missing or unexpected or mismatched or unmapped:
            raise mismatch_error(
                f"transformer_hf.hf_pretrained = {source!r}", missing, unexpected, mismatched, unmapped
            )

        values = {}
        for rule in rules:
            leaf = targets[rule.flax]
            if "{i}" in rule.hf:
                # one aligned host buffer in the parameter's dtype (placed without a copy on CPU); each layer's
                # tensor is converted into its slice
                value = aligned_empty(tuple(leaf.shape), np.dtype(leaf.dtype))
                for i in range(L):
                    value[i] = _convert(rule, reader.get(_hf_name(rule, src, i)), config)
            else:
                value = _convert(rule, reader.get(_hf_name(rule, src)), config)
            values[prefix + rule.flax] = _place(value, leaf)
            del value
    return [ckpt_lib.set_flat_params(state, values) for state in states]


def load_transformer_hf_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``transformer_hf``: the ``hf_pretrained`` checkpoint's tensors into the built model."""
    if not params.hf_pretrained:
        return list(states)
    path = resolve_hf_path(params.hf_pretrained)
    if os.path.isfile(os.path.join(path, CONFIG_ONLY_MARKER)):
        if not params.resume_from_checkpoint:
            raise HFLoadError(
                f"transformer_hf.hf_pretrained = {params.hf_pretrained!r} holds only the config of a converted run "
                f"(its weights are in that run's Orbax checkpoint); set transformer_hf.resume_from_checkpoint = "
                f"'{os.path.dirname(path)}' and transformer_hf.resume_weights_only = True."
            )
        return list(states)  # the weights come from resume_from_checkpoint
    return load_hf_decoder_weights(path, hf_decoder_config(params), states, prefix, source=params.hf_pretrained)
