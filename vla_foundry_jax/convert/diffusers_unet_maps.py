"""Strict loader of a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` directory into
:class:`~vla_foundry_jax.models.diffusers_unet.DiffusersUNet` (``unet.hf_pretrained``; registered weight loader).

A diffusers model directory holds ``config.json`` (read here as plain JSON: diffusers is never imported) and
``diffusion_pytorch_model.safetensors`` (or shards named in ``diffusion_pytorch_model.safetensors.index.json``).
``hf_pretrained`` is such a directory, a pipeline directory with a ``unet/`` subfolder, or a hub id whose root
holds the UNet (fetched by :func:`~vla_foundry_jax.convert.hf_loader.resolve_hf_path`).

The map is declarative and follows from the module tree, whose paths are diffusers' state-dict names:

* Flax ``<path>.kernel`` of rank 4 <- ``<path>.weight`` ``[O, I, kh, kw]`` transposed to ``[kh, kw, I, O]``;
* Flax ``<path>.kernel`` of rank 2 <- ``<path>.weight`` ``[out, in]`` transposed;
* Flax ``<path>.scale`` (GroupNorm / LayerNorm) <- ``<path>.weight``; ``<path>.bias`` <- ``<path>.bias``;
* older checkpoints' attention names are accepted for the (non-transformer) ``Attention`` blocks, as diffusers'
  loader does: ``query`` / ``key`` / ``value`` / ``proj_attn`` for ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``.

Strict: every checkpoint tensor consumed, every parameter filled, every shape equal, else
:class:`~vla_foundry_jax.convert.hf_loader.HFLoadError` lists the missing, unexpected and mismatched names. Each
tensor is cast to the parameter's dtype and placed in its sharding, one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.convert.hf_decoder_maps import _place, mismatch_error
from vla_foundry_jax.convert.hf_loader import HFLoadError, SafetensorsReader, resolve_hf_path

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS_NAME + ".index.json"
LEGACY_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def diffusers_model_dir(hf_pretrained: str) -> str:
    """The directory holding the UNet's ``config.json`` (a pipeline directory's ``unet/`` subfolder if needed)."""
    path = resolve_hf_path(hf_pretrained)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "unet", "config.json")
    ):
        path = os.path.join(path, "unet")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HFLoadError(f"unet.hf_pretrained = {hf_pretrained!r}: {path} has no config.json (nor unet/config.json).")
    return path


def read_diffusers_config(hf_pretrained: str) -> tuple[str, dict[str, Any]]:
    """``(model directory, config.json as a dict)`` of a diffusers UNet."""
    path = diffusers_model_dir(hf_pretrained)
    with open(os.path.join(path, "config.json")) as f:
        try:
            return path, json.load(f)
        except ValueError as e:
            raise HFLoadError(f"{path}/config.json is not JSON: {e}") from e


def open_weights(path: str) -> SafetensorsReader:
    """A reader over the UNet's safetensors in ``path`` (single file or the shards of the index)."""
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return SafetensorsReader(single)
    index = os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        reader = SafetensorsReader(next(iter(files.values())))
        reader.files = files  # the reader opens files by this map; the first shard only seeded it
        return reader
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


def hf_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The torch shape of a Flax parameter shape (conv ``HWIO -> OIHW``, linear transposed)."""
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def to_flax(value: np.ndarray) -> np.ndarray:
    """A torch tensor in the Flax layout (see :func:`hf_shape`)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def _legacy(name: str) -> str | None:
    if "transformer_blocks" in name:
        return None
    for new, old in LEGACY_ATTENTION.items():
        if new in name:
            return name.replace(new, old)
    return None


def load_diffusers_unet(path: str, states: Sequence[Any], prefix: str = "", where: str = "unet") -> list[Any]:
    """Fill the parameters under ``prefix`` in ``states`` from the diffusers model directory ``path``."""
    targets: dict[str, Any] = {}
    for state in states:
        for name, leaf in ckpt_lib.flat_params(state).items():
            if name.startswith(prefix):
                targets[name[len(prefix) :]] = leaf
    if "conv_in.kernel" not in targets:
        raise HFLoadError(f"{where}: no diffusers UNet parameters under the module path {prefix!r}.")
    with open_weights(path) as reader:
        keys = set(reader.keys())
        sources: dict[str, str] = {}
        missing, mismatched = [], []
        for flax_name, leaf in sorted(targets.items()):
            name = hf_name(flax_name)
            legacy = _legacy(name)
            src = name if name in keys or legacy not in keys else legacy
            if src not in keys:
                missing.append(name)
                continue
            sources[flax_name] = src
            want = hf_shape(leaf.shape)
            if reader.shape(src) != want:
                mismatched.append(f"{src}: checkpoint {reader.shape(src)} vs model {want}")
        unexpected = sorted(keys - set(sources.values()))
        if missing or unexpected or mismatched:
            raise mismatch_error(where, missing, unexpected, mismatched, [])
        values = {prefix + f: _place(to_flax(reader.get(src)), targets[f]) for f, src in sources.items()}
    return [ckpt_lib.set_flat_params(state, values) for state in states]


def load_unet_weights(params: Any, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``unet``: the diffusers checkpoint named by ``unet.hf_pretrained`` (if set)."""
    if not getattr(params, "hf_pretrained", None):
        return list(states)
    path = diffusers_model_dir(params.hf_pretrained)
    where = f"{params.gin_name}.hf_pretrained = {params.hf_pretrained!r}"
    return load_diffusers_unet(path, states, prefix, where)
