"""Strict loader of a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` directory into
:class:`~vla_foundry_jax.models.diffusers_unet.DiffusersUNet` (``unet.hf_pretrained``; registered weight loader).

A diffusers model directory holds ``config.json`` (read here as plain JSON: diffusers is never imported) and
``diffusion_pytorch_model.safetensors`` (or shards named in ``diffusion_pytorch_model.safetensors.index.json``).
``hf_pretrained`` is such a directory, a pipeline directory with a ``unet/`` subfolder, or a hub id whose root
holds the UNet (:func:`~vla_foundry_jax.configs.diffusers_unet.diffusers_model_dir`).

The table follows from the module tree, whose paths are diffusers' state-dict names (one rule per parameter,
transform ``TORCH_LAYOUT``):

* Flax ``<path>.kernel`` of rank 4 <- ``<path>.weight`` ``[O, I, kh, kw]`` transposed to ``[kh, kw, I, O]``;
* Flax ``<path>.kernel`` of rank 2 <- ``<path>.weight`` ``[out, in]`` transposed;
* Flax ``<path>.scale`` (GroupNorm / LayerNorm) <- ``<path>.weight``; ``<path>.bias`` <- ``<path>.bias``;
* older checkpoints' attention names are accepted for the (non-transformer) ``Attention`` blocks, as diffusers'
  loader does: ``query`` / ``key`` / ``value`` / ``proj_attn`` for ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``.

Strict (:func:`~vla_foundry_jax.convert.engine.load_rules`): every checkpoint tensor consumed, every parameter
filled, every shape equal. Each tensor is cast to the parameter's dtype and placed in its sharding, one at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vla_foundry_jax.configs.diffusers_unet import diffusers_model_dir
from vla_foundry_jax.configs.hf_hub import HFLoadError
from vla_foundry_jax.configs.safetensors import read_index
from vla_foundry_jax.convert.engine import TORCH_LAYOUT, Rule, load_rules, target_leaves
from vla_foundry_jax.convert.sources import SafetensorsReader

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS_NAME + ".index.json"
LEGACY_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def open_weights(path: str) -> SafetensorsReader:
    """A reader over the UNet's safetensors in ``path`` (single file or the shards of the index)."""
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return SafetensorsReader(single)
    index = os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(index):
        return SafetensorsReader(path, files=read_index(index))
    present = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    raise HFLoadError(
        f"{path} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX}); it holds {present or 'no weight files'}. Re-save the "
        f"model with diffusers' `save_pretrained(dir, safe_serialization=True)` (no variant) and point "
        f"unet.hf_pretrained at it."
    )


def hf_name(flax_name: str) -> str:
    """The diffusers state-dict name of a Flax parameter path."""
    head, _, leaf = flax_name.rpartition(".")
    return f"{head}.{'bias' if leaf == 'bias' else 'weight'}"


def _legacy(name: str) -> str | None:
    if "transformer_blocks" in name:
        return None
    for new, old in LEGACY_ATTENTION.items():
        if new in name:
            return name.replace(new, old)
    return None


def unet_rules(flax_names: Sequence[str], keys: Sequence[str]) -> list[Rule]:
    """One rule per parameter: its diffusers name, or the legacy attention name an older checkpoint holds."""
    ks = set(keys)
    rules = []
    for flax_name in sorted(flax_names):
        name = hf_name(flax_name)
        legacy = _legacy(name)
        rules.append(Rule(flax_name, name if name in ks or legacy not in ks else legacy, TORCH_LAYOUT))
    return rules


def load_diffusers_unet(path: str, states: Sequence[Any], prefix: str = "", where: str = "unet") -> list[Any]:
    """Fill the parameters under ``prefix`` in ``states`` from the diffusers model directory ``path``."""
    targets = target_leaves(states, prefix)
    if "conv_in.kernel" not in targets:
        raise HFLoadError(f"{where}: no diffusers UNet parameters under the module path {prefix!r}.")
    with open_weights(path) as reader:
        return load_rules(reader, unet_rules(list(targets), reader.keys()), states, prefix, where=where)


def load_unet_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``unet``: the diffusers checkpoint named by ``unet.hf_pretrained`` (if set)."""
    if not getattr(params, "hf_pretrained", None):
        return list(states)
    path = diffusers_model_dir(params.hf_pretrained)
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    return load_diffusers_unet(path, states, prefix, where)
