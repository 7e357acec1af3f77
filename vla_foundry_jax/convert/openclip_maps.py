"""Strict weight loader for ``clip_openclip``: an OpenCLIP ``CLIP`` state dict (safetensors) into our CLIP model.

``pretrained_weights`` is a ``.safetensors`` file (e.g. OpenCLIP's ``open_clip_model.safetensors``) or a directory
holding safetensors files. Tensor names are OpenCLIP's OpenAI-style ones (a leading ``module.`` from DDP
checkpoints is stripped); ``{i}`` is a block index, stacked on our leading ``layers`` axis:

| OpenCLIP tensor                                        | our parameter                                        |
|--------------------------------------------------------|------------------------------------------------------|
| ``visual.conv1.weight [D, 3, p, p]``                   | ``vision_model.embeddings.patch_embedding.kernel``   |
| ``visual.class_embedding`` / ``visual.positional_embedding`` | ``vision_model.embeddings.class_/position_embedding`` |
| ``visual.ln_pre.*`` / ``visual.ln_post.*``             | ``vision_model.pre_layrnorm.*`` / ``post_layernorm.*`` |
| ``visual.proj [D_v, P]``                               | ``visual_projection.kernel`` (as is)                 |
| ``token_embedding.weight`` / ``positional_embedding``  | ``text_model.embeddings.token_/position_embedding``  |
| ``ln_final.*``                                         | ``text_model.final_layer_norm.*``                    |
| ``text_projection [D_t, P]`` / ``logit_scale``         | ``text_projection.kernel`` (as is) / ``logit_scale`` |

and per block, ``visual.transformer.resblocks.{i}.`` -> ``vision_model.encoder.layers.`` and
``transformer.resblocks.{i}.`` -> ``text_model.encoder.layers.``: ``ln_1`` / ``ln_2`` -> ``layer_norm1`` /
``layer_norm2``; the fused ``attn.in_proj_weight [3D, D]`` / ``attn.in_proj_bias [3D]`` split in (q, k, v) order
into ``self_attn.{q,k,v}_proj`` (weights transposed to ``[in, out]`` kernels); ``attn.out_proj`` ->
``self_attn.out_proj``; ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.fc1`` / ``mlp.fc2``.

Strict: every checkpoint tensor consumed, every parameter under the prefix filled, every shape equal; otherwise
:class:`~vla_foundry_jax.convert.hf_loader.HFLoadError` lists the names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.convert.hf_decoder_maps import _place
from vla_foundry_jax.convert.hf_loader import HFLoadError, SafetensorsReader
from vla_foundry_jax.models.clip import CLIPConfig
from vla_foundry_jax.models.openclip_configs import openclip_config


def _copy(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _conv(x: np.ndarray) -> np.ndarray:  # [D, 3, p, p] -> [p (row), p (col), 3, D] -> [p*p*3, D]
    return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])


def _qkv(j: int, transpose: bool) -> Callable[[np.ndarray], np.ndarray]:
    def split(x: np.ndarray) -> np.ndarray:
        if x.shape[0] % 3:
            raise ValueError(f"fused in_proj has leading size {x.shape[0]}, not a multiple of 3")
        part = np.split(x, 3, axis=0)[j]
        return part.T if transpose else part

    return split


@dataclasses.dataclass(frozen=True)
class OpenCLIPRule:
    flax: str  # path relative to the model
    src: str  # OpenCLIP name; "{i}" = block index
    convert: Callable[[np.ndarray], np.ndarray] = _copy
    layers: int | None = None  # number of stacked blocks, or None


def _norm(flax: str, src: str, layers: int | None = None) -> list[OpenCLIPRule]:
    return [OpenCLIPRule(f"{flax}.{w}", f"{src}.{w}", layers=layers) for w in ("weight", "bias")]


def _block_rules(flax: str, src: str, n: int) -> list[OpenCLIPRule]:
    f, s = flax + "encoder.layers.", src + "transformer.resblocks.{i}."
    rules = _norm(f + "layer_norm1", s + "ln_1", n) + _norm(f + "layer_norm2", s + "ln_2", n)
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rules += [
            OpenCLIPRule(f"{f}self_attn.{name}.kernel", s + "attn.in_proj_weight", _qkv(j, True), n),
            OpenCLIPRule(f"{f}self_attn.{name}.bias", s + "attn.in_proj_bias", _qkv(j, False), n),
        ]
    for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        rules += [
            OpenCLIPRule(f"{f}{ours}.kernel", f"{s}{theirs}.weight", _t, n),
            OpenCLIPRule(f"{f}{ours}.bias", f"{s}{theirs}.bias", layers=n),
        ]
    return rules


def openclip_rules(c: CLIPConfig) -> list[OpenCLIPRule]:
    """Every tensor of an OpenCLIP ``CLIP`` (plain ViT + OpenAI-style text tower) -> our :class:`CLIPModel`."""
    v, t = "vision_model.", "text_model."
    return [
        OpenCLIPRule(v + "embeddings.patch_embedding.kernel", "visual.conv1.weight", _conv),
        OpenCLIPRule(v + "embeddings.class_embedding", "visual.class_embedding"),
        OpenCLIPRule(v + "embeddings.position_embedding", "visual.positional_embedding"),
        *_norm(v + "pre_layrnorm", "visual.ln_pre"),
        *_block_rules(v, "visual.", c.vision.num_layers),
        *_norm(v + "post_layernorm", "visual.ln_post"),
        OpenCLIPRule("visual_projection.kernel", "visual.proj"),
        OpenCLIPRule(t + "embeddings.token_embedding", "token_embedding.weight"),
        OpenCLIPRule(t + "embeddings.position_embedding", "positional_embedding"),
        *_block_rules(t, "", c.text.num_layers),
        *_norm(t + "final_layer_norm", "ln_final"),
        OpenCLIPRule("text_projection.kernel", "text_projection"),
        OpenCLIPRule("logit_scale", "logit_scale"),
    ]


def open_reader(path: str) -> SafetensorsReader:
    if os.path.isdir(path):
        return SafetensorsReader(path)
    if not os.path.isfile(path):
        raise HFLoadError(f"{path} does not exist.")
    if not path.endswith(".safetensors"):
        raise HFLoadError(
            f"{path} is not a .safetensors file; convert the OpenCLIP checkpoint once with PyTorch, e.g. "
            f"`safetensors.torch.save_file(model.state_dict(), 'open_clip_model.safetensors')`."
        )
    return SafetensorsReader(path)


def load_openclip(
    path: str, rules: Sequence[OpenCLIPRule], states: Sequence[Any], prefix: str = "", *, where: str = "checkpoint"
) -> list[Any]:
    """Fill the parameters under ``prefix`` in ``states`` from the OpenCLIP safetensors at ``path`` (strict)."""
    targets: dict[str, Any] = {}
    for state in states:
        for name, leaf in ckpt_lib.flat_params(state).items():
            if name.startswith(prefix):
                targets[name[len(prefix) :]] = leaf
    with open_reader(path) as reader:
        keys = reader.keys()
        strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""
        available = {k[len(strip) :]: k for k in keys}
        needed = {r.src.format(i=i) for r in rules for i in (range(r.layers) if r.layers else [None])}
        missing = sorted(needed - set(available))
        unexpected = sorted(set(available) - needed)
        unmapped = sorted(set(targets) - {r.flax for r in rules})
        unmapped += [f"(rule without parameter) {r.flax}" for r in rules if r.flax not in targets]
        cache: dict[str, np.ndarray] = {}
        values, mismatched = {}, []
        if not (missing or unexpected or unmapped):
            for r in rules:
                leaf = targets[r.flax]
                want = tuple(leaf.shape[1:] if r.layers else leaf.shape)
                parts = []
                for i in range(r.layers) if r.layers else [None]:
                    name = r.src.format(i=i)
                    if name not in cache:
                        cache[name] = reader.get(available[name])
                    try:
                        part = r.convert(cache[name])
                    except ValueError as e:
                        part, why = None, str(e)
                    if part is None or tuple(part.shape) != want:
                        got = f"{tuple(cache[name].shape)}" + ("" if part is not None else f" ({why})")
                        mismatched.append(f"{name}: checkpoint {got} does not give {r.flax} {want}")
                        break
                    parts.append(part)
                if len(parts) == (r.layers or 1):
                    value = np.stack(parts) if r.layers else parts[0]
                    values[prefix + r.flax] = _place(value, leaf)
    if missing or unexpected or unmapped or mismatched:
        lines = [f"{where} does not match the model built from its architecture:"]
        for label, names in (
            ("shape mismatches", mismatched),
            ("missing from the checkpoint", missing),
            ("in the checkpoint but not used by the model", unexpected),
            ("model parameters no rule fills", unmapped),
        ):
            if names:
                lines.append(f"  {label} ({len(names)}): " + "; ".join(names[:20]))
        if missing or unexpected or mismatched:
            lines.append("  Is `architecture` the one these weights were trained with?")
        raise HFLoadError("\n".join(lines))
    return [ckpt_lib.set_flat_params(state, values) for state in states]


def load_clip_openclip_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``clip_openclip``: every tensor of ``pretrained_weights`` into the built model."""
    if not params.pretrained_weights:
        return list(states)
    where = f"{params.gin_name}.pretrained_weights = {params.pretrained_weights!r}"
    rules = openclip_rules(openclip_config(params))
    return load_openclip(params.pretrained_weights, rules, states, prefix, where=where)
