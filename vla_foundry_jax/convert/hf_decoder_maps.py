"""``transformer_hf``: the declarative HF-safetensors -> parameter table (:data:`ARCH_MAPS`) and its weight loader.

One table per architecture: each :class:`~vla_foundry_jax.convert.engine.Rule` maps an HF tensor name pattern
(relative to the decoder body) to a Flax path (relative to the model) with a transform: ``COPY``; ``TRANSPOSE``
(torch Linear weights to our kernels); :data:`RMS_NORM`, which :func:`decoder_rules` makes ``ADD_ONE`` for Gemma's
norms (``x * (1 + w)``: ``+ 1`` folded in) and ``COPY`` otherwise. ``{i}``: one HF tensor per layer, stacked on a
leading ``layers`` axis. A rule's ``when`` is a predicate on :class:`~vla_foundry_jax.configs.hf_decoder.
HFDecoderConfig` (``qkv_bias``, untied ``lm_head`` ...). HF names may carry a ``model.`` prefix (``*ForCausalLM``
checkpoints) or not (bare ``*Model``); :data:`LM_HEAD` is outside the body. ``lm_head.weight`` stored next to tied
embeddings is ignored (HF ties it too), as are stale ``rotary_emb.inv_freq`` buffers. The tables serve the VLM
language models (:mod:`~vla_foundry_jax.convert.vlm_hf_maps`) and the export back to HF
(``apps.hf_conversion``) too.

Strict, through :func:`~vla_foundry_jax.convert.engine.load_rules` (every HF tensor consumed, every parameter
filled, every shape equal; else one report of the missing, unexpected and mismatched names), each tensor placed
straight into the target leaf's sharding, stacked ones assembled layer by layer without an ``np.stack`` copy.

A directory holding :data:`CONFIG_ONLY_MARKER` (``<run>/hf_config`` of a run made by ``launch.convert_hf``) has a
config but no tensors: the loader then leaves the parameters to ``resume_from_checkpoint`` (and says so if unset).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.configs.hf_decoder import HFDecoderConfig, hf_decoder_config
from vla_foundry_jax.configs.hf_hub import HFLoadError, resolve_hf_path
from vla_foundry_jax.convert.engine import (
    ADD_ONE,
    COPY,
    TRANSPOSE,
    Rule,
    Transform,
    flag,
    load_rules,
    resolve,
    target_leaves,
)
from vla_foundry_jax.convert.sources import SafetensorsReader

# an HF RMSNorm weight: ``ADD_ONE`` for Gemma's (1 + w) norms, else ``COPY`` (see :func:`decoder_rules`)
RMS_NORM = Transform("rms_norm", COPY.apply, COPY.source_shape, COPY.invert)
_LAYER = "layers.{i}."
BASE = (
    Rule("embed_tokens", "embed_tokens.weight"),
    Rule("layers.input_layernorm.scale", _LAYER + "input_layernorm.weight", RMS_NORM),
    Rule("layers.self_attn.q_proj.kernel", _LAYER + "self_attn.q_proj.weight", TRANSPOSE),
    Rule("layers.self_attn.k_proj.kernel", _LAYER + "self_attn.k_proj.weight", TRANSPOSE),
    Rule("layers.self_attn.v_proj.kernel", _LAYER + "self_attn.v_proj.weight", TRANSPOSE),
    Rule("layers.self_attn.o_proj.kernel", _LAYER + "self_attn.o_proj.weight", TRANSPOSE),
    Rule("layers.post_attention_layernorm.scale", _LAYER + "post_attention_layernorm.weight", RMS_NORM),
    Rule("layers.mlp.gate_proj.kernel", _LAYER + "mlp.gate_proj.weight", TRANSPOSE),
    Rule("layers.mlp.up_proj.kernel", _LAYER + "mlp.up_proj.weight", TRANSPOSE),
    Rule("layers.mlp.down_proj.kernel", _LAYER + "mlp.down_proj.weight", TRANSPOSE),
    Rule("norm.scale", "norm.weight", RMS_NORM),
)
QKV_BIAS = tuple(
    Rule(f"layers.self_attn.{p}_proj.bias", _LAYER + f"self_attn.{p}_proj.bias", when=flag("qkv_bias")) for p in "qkv"
)
O_BIAS = (Rule("layers.self_attn.o_proj.bias", _LAYER + "self_attn.o_proj.bias", when=flag("o_bias")),)
MLP_BIAS = tuple(
    Rule(f"layers.mlp.{p}_proj.bias", _LAYER + f"mlp.{p}_proj.bias", when=flag("mlp_bias"))
    for p in ("gate", "up", "down")
)
QK_NORM = tuple(Rule(f"layers.self_attn.{p}_norm.scale", _LAYER + f"self_attn.{p}_norm.weight", RMS_NORM) for p in "qk")
SANDWICH = tuple(
    Rule(f"layers.{n}.scale", _LAYER + f"{n}.weight", RMS_NORM)
    for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
)
# the decoder body's tables (HF names relative to the body: ``model.`` in ``*ForCausalLM`` checkpoints)
ARCH_MAPS: dict[str, tuple[Rule, ...]] = {
    "llama": BASE + QKV_BIAS + O_BIAS + MLP_BIAS,
    "qwen2": BASE + QKV_BIAS,
    "qwen3": BASE + QKV_BIAS + O_BIAS + QK_NORM,
    "mistral": BASE,
    "gemma": BASE + QKV_BIAS + O_BIAS,
    "gemma2": BASE + QKV_BIAS + O_BIAS + SANDWICH,
}
# outside the body; only when the embeddings are untied
LM_HEAD = Rule("lm_head", "lm_head.weight", TRANSPOSE, when=lambda c: not c.tie_word_embeddings)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Written by ``launch.convert_hf`` into ``<run>/hf_config/``: a config (and tokenizer) directory without weights;
# the weights live in the run's Orbax checkpoint and are loaded through ``resume_from_checkpoint``.
CONFIG_ONLY_MARKER = "converted_run.json"


def decoder_rules(
    c: HFDecoderConfig, source_prefix: str = "", target_prefix: str = "", lm_head: str | None = "lm_head.weight"
) -> list[Rule]:
    """The concrete rules of a decoder ``c``: body tensors under ``source_prefix``, parameters under
    ``target_prefix``, the untied ``lm_head`` from the tensor ``lm_head`` (None: no head rule)."""
    norm = {RMS_NORM: ADD_ONE if c.norm_offset else COPY}
    rules = resolve(
        ARCH_MAPS[c.model_type],
        c,
        layers=c.num_layers,
        source_prefix=source_prefix,
        target_prefix=target_prefix,
        transforms=norm,
    )
    if lm_head is not None:
        rules += resolve([dataclasses.replace(LM_HEAD, source=lm_head)], c, target_prefix=target_prefix)
    return rules


def load_hf_decoder_weights(
    path: str, config: HFDecoderConfig, states: Sequence[Any], prefix: str = "", source: str | None = None
) -> list[Any]:
    """Fill the ``transformer_hf`` parameters under ``prefix`` in ``states`` from the HF checkpoint directory."""
    if "embed_tokens" not in target_leaves(states, prefix):
        raise HFLoadError(f"no transformer_hf parameters under the module path {prefix!r}.")
    with SafetensorsReader(path) as reader:
        keys = reader.keys()
        body = "model." if any(k.startswith("model.embed_tokens.") for k in keys) else ""
        rules = decoder_rules(config, body)

        def ignore(name: str) -> bool:
            return name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")

        where = f"transformer_hf.hf_pretrained = {source or path!r}"
        return load_rules(reader, rules, states, prefix, where=where, ignore=ignore)


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
