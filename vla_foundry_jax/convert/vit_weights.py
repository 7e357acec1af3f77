"""``vit.pretrained``: start a ``vit`` / ``vit_backbone`` from outside weights (registered weight loader).

``pretrained`` is one of
  * a ``.safetensors`` file (or a directory holding exactly one) in the **original's** ViT naming (reference §3.4):
    ``patch_embedding.conv.weight [H, 3, p, p]``, ``patch_embedding.conv.bias``,
    ``patch_embedding.position_embedding [1, n_p (+1), H]``, ``patch_embedding.cls_token [1, 1, H]``,
    ``blocks.{i}.ln1|ln2.weight/bias``, ``blocks.{i}.attn.qkv_proj|out_proj.weight [out, in]/bias``,
    ``blocks.{i}.mlp.fc1|fc2.weight/bias``, ``layer_norm.weight/bias``. A ``module.`` / ``_orig_mod.`` wrapper
    prefix is stripped (judged on the first key, as the original's ``unwrap_state_dict``), and a VLM state dict's
    ``vit.`` tensors are used when the file has no bare ViT names (its other tensors are ignored);
  * one of our runs (run, ``checkpoints/`` or step directory): a standalone ``vit`` run or any run whose model holds
    exactly one custom ViT (e.g. a ``vlm``: its ``vit.`` weights), located through the run's stored params.

The original-format file is read through the conversion engine (:func:`vit_rules`, one table used both ways: also
by :func:`export_original_state_dict`). Strict: every source tensor consumed, every parameter filled, shapes equal,
else the engine's report of the missing, unexpected and mismatched names. The one tolerated mismatch is the position
embedding's token grid: a stored grid ``g x g`` different from the model's ``img_size / patch_size`` is resized with
``vit.interpolation_mode``
(``bicubic`` / ``bilinear`` / ``nearest``, torch ``F.interpolate(..., align_corners=False)`` semantics, see
:func:`torch_interpolate`); the CLS row is kept as is. Each loaded tensor is cast to the parameter's dtype and placed
directly in the parameter's sharding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import paths
from vla_foundry_jax.convert.engine import (
    COPY,
    PATCH_CONV,
    SQUEEZE_LEADING,
    TRANSPOSE,
    Rule,
    Transform,
    load_rules,
    place,
    target_leaves,
)
from vla_foundry_jax.convert.sources import PrefixedSource, SafetensorsReader
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params.model_params import ModelParams, ViTParams, submodel_params

INTERPOLATION_MODES = ("bicubic", "bilinear", "nearest")
VIT_TYPES = ("vit", "vit_backbone")
POS = "patch_embedding.position_embedding"
CONV = "patch_embedding.conv.kernel"
CLS = "patch_embedding.cls_token"
BICUBIC_A = -0.75


class WeightLoadError(VLAFoundryError, ValueError):
    """Pretrained weights that do not fit the model (names and shapes listed)."""


# ----------------------------------------------------------------------------------------------------------
# torch-compatible interpolation (F.interpolate, align_corners=False)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """torch's ``get_cubic_upsample_coefficients`` (Keys cubic convolution, A = -0.75) -> ``[..., 4]``."""
    A = BICUBIC_A

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def interpolation_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """``[out_size, in_size]`` float64 matrix ``M`` with ``resize(v) = M @ v`` along one axis (torch semantics).

    * ``bicubic``: source ``(o + 0.5) * in/out - 0.5`` (not clamped), 4 taps at ``floor - 1 .. floor + 2`` with
      cubic-convolution weights (A = -0.75), tap indices clamped to the border (torch's bounded access);
    * ``bilinear``: source clamped at 0, taps ``i0 = floor`` and ``min(i0 + 1, in - 1)``;
    * ``nearest``: torch's legacy ``nearest``: ``min(floor(o * in/out), in - 1)`` in float32 arithmetic.
    """
    if mode not in INTERPOLATION_MODES:
        raise WeightLoadError(
            f"vit.interpolation_mode = {mode!r} is not supported; choose one of {list(INTERPOLATION_MODES)}."
        )
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if in_size == out_size:
        return np.eye(in_size)
    if mode == "nearest":
        if out_size == 2 * in_size:
            src = rows >> 1
        else:
            scale = np.float32(in_size) / np.float32(out_size)
            src = np.minimum(np.floor(rows.astype(np.float32) * scale).astype(np.int64), in_size - 1)
        m[rows, src] = 1.0
        return m
    # Source coordinates in float32 arithmetic, as torch computes them for float tensors.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    real = ((rows.astype(f32) + f32(0.5)) * scale - f32(0.5)).astype(np.float64)
    if mode == "bilinear":
        real = np.maximum(real, 0.0)
        i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
        lam = np.clip(real - i0, 0.0, 1.0)
        i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
        np.add.at(m, (rows, i0), 1.0 - lam)
        np.add.at(m, (rows, i1), lam)
        return m
    base = np.floor(real).astype(np.int64)
    w = _cubic_weights(real - base)
    for tap in range(4):
        np.add.at(m, (rows, np.clip(base - 1 + tap, 0, in_size - 1)), w[:, tap])
    return m


def torch_interpolate(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """``F.interpolate(x, size, mode, align_corners=False)`` for ``x [..., h, w]`` (NumPy, float64 math).

    The 2-D resize is separable (rows, then columns), as torch's kernels are; returns ``[..., size[0], size[1]]``
    in float64.
    """
    x = np.asarray(x, np.float64)
    mh = interpolation_matrix(x.shape[-2], size[0], mode)
    mw = interpolation_matrix(x.shape[-1], size[1], mode)
    return np.einsum("oh,...hw,pw->...op", mh, x, mw)


def resize_position_embedding(pos: np.ndarray, grid: int, *, cls_flag: bool, mode: str) -> np.ndarray:
    """Resize a position table ``[(1 +) g*g, H]`` to ``[(1 +) grid*grid, H]`` on its square token grid.

    The CLS row (first, when ``cls_flag``) is kept unchanged; the grid is resized with :func:`torch_interpolate`.
    """
    head, body = (pos[:1], pos[1:]) if cls_flag else (pos[:0], pos)
    n, H = body.shape
    g = math.isqrt(n)
    if g * g != n:
        raise WeightLoadError(f"{POS}: {n} patch positions do not form a square grid; cannot resize.")
    img = body.reshape(g, g, H).transpose(2, 0, 1)  # [H, g, g]
    out = torch_interpolate(img, (grid, grid), mode).transpose(1, 2, 0).reshape(grid * grid, H)
    return np.concatenate([np.asarray(head, np.float64), out], axis=0)


# ----------------------------------------------------------------------------------------------------------
# The table: ours <-> the original's state dict


def _pos_resizable(stored: tuple[int, ...], target: tuple[int, ...], cls_flag: bool) -> bool:
    """Same width, and the stored rows (minus the CLS row) form a square grid: a resize can fix the mismatch."""
    if len(stored) != len(target) or stored[-1] != target[-1]:
        return False
    n = stored[-2] - (1 if cls_flag else 0)
    return n > 0 and math.isqrt(n) ** 2 == n


def position_transform(params: ViTParams | None = None) -> Transform:
    """``[1, T, H]`` -> ``[T, H]``; with ``params``, a stored table of another square grid is resized to
    ``params``' grid (``interpolation_mode``), the CLS row kept."""
    if params is None:
        return SQUEEZE_LEADING

    def apply(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        value = value.reshape(value.shape[-2], value.shape[-1])
        return value if value.shape == tuple(shape) else _resize_pos(value, params)

    def fits(have: tuple[int, ...], shape: tuple[int, ...]) -> bool:
        return _pos_resizable(have, SQUEEZE_LEADING.source_shape(shape), params.cls_flag)

    return Transform("position_table", apply, SQUEEZE_LEADING.source_shape, SQUEEZE_LEADING.invert, fits)


def vit_rules(names: Iterable[str], n_layers: int, params: ViTParams | None = None) -> list[Rule]:
    """One rule per ViT parameter ``names`` (ours): the original's tensor name (``blocks.{i}.*`` stacked over
    ``n_layers``) and layout (``.kernel`` transposed from ``.weight``, the patch conv, the ``[1, ...]`` tokens)."""
    rules = []
    for name in sorted(names):
        source = name[: -len(".kernel")] + ".weight" if name.endswith(".kernel") else name
        if name == CONV:
            transform = PATCH_CONV
        elif name == POS:
            transform = position_transform(params)
        elif name == CLS:
            transform = SQUEEZE_LEADING
        else:
            transform = TRANSPOSE if name.endswith(".kernel") else COPY
        stacked = name.startswith("blocks.")
        if stacked:
            source = "blocks.{i}." + source[len("blocks.") :]
        rules.append(Rule(name, source, transform, n_layers if stacked else None))
    return rules


def export_original_state_dict(state: Any, n_layers: int) -> dict[str, np.ndarray]:
    """A ViT's ``nnx.State`` (ours) -> ``{original name: array}`` in the original's layout (float32 NumPy)."""
    flat = ckpt_lib.flat_params(state)
    out = {}
    for rule in vit_rules(flat, n_layers):
        value = np.asarray(jax.device_get(flat[rule.target]), np.float32)
        per_layer = [value[i] for i in range(n_layers)] if rule.stacked else [value]
        for orig, v in zip(rule.source_names(), per_layer, strict=True):
            out[orig] = np.ascontiguousarray(rule.transform.invert(v))
    return out


# ----------------------------------------------------------------------------------------------------------
# Sources


def _host(x: Any) -> np.ndarray:
    """A host copy of a (replicated) array, also when it spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _targets(states: Sequence[Any], prefix: str) -> dict[str, Any]:
    """``{name relative to prefix: leaf}`` of the ViT's parameters across ``states``."""
    out = target_leaves(states, prefix)
    if POS not in out:
        raise WeightLoadError(f"no ViT parameters under the module path {prefix!r} (expected {prefix}{POS}).")
    return out


def _source_prefix(keys: list[str]) -> str:
    """The wrapper prefix of a state dict's ViT tensors (``module.``, ``_orig_mod.``, a VLM's ``vit.``)."""
    prefix = ""
    while keys and any(keys[0].startswith(prefix + w) for w in ("_orig_mod.", "module.")):
        prefix += next(w for w in ("_orig_mod.", "module.") if keys[0].startswith(prefix + w))
    names = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    if not any(k.startswith("patch_embedding.") for k in names) and any(
        k.startswith("vit.patch_embedding.") for k in names
    ):
        prefix += "vit."
    return prefix


VIT_HINT = "Set the vit.* sizes (hidden_dim, inter_dim, patch_size, n_layers, cls_flag) the weights were made with."


def load_safetensors(path: str, params: ViTParams, states: Sequence[Any], prefix: str) -> list[Any]:
    """Fill the ViT under ``prefix`` in ``states`` from an original-format safetensors file (see module doc)."""
    targets = _targets(states, prefix)
    with SafetensorsReader(path) as reader:
        source = PrefixedSource(reader, _source_prefix(reader.keys()))
        rules = vit_rules(targets, params.n_layers, params)
        where = f"vit.pretrained = {path!r}"
        return load_rules(source, rules, states, prefix, where=where, noun="file", hint=VIT_HINT, error=WeightLoadError)


def _resize_pos(value: np.ndarray, params: ViTParams) -> np.ndarray:
    grid = params.img_size // params.patch_size
    return resize_position_embedding(
        np.asarray(value, np.float64), grid, cls_flag=params.cls_flag, mode=params.interpolation_mode
    )


def _vit_paths(model: ModelParams, prefix: str = "") -> list[str]:
    out = [prefix] if model.type in VIT_TYPES else []
    for field, child in submodel_params(model).items():
        out += _vit_paths(child, f"{prefix}{field}.")
    return out


def load_run(path: str, params: ViTParams, states: Sequence[Any], prefix: str) -> list[Any]:
    """Fill the ViT under ``prefix`` from one of our runs (standalone ViT or a model holding one ViT)."""
    step_dir = ckpt_lib.resolve_step_dir(path)
    try:
        stored_model = ckpt_lib.load_experiment_params(step_dir).model
    except FileNotFoundError as e:
        raise WeightLoadError(f"vit.pretrained = {path!r}: {step_dir} has no params item ({e}).") from e
    paths = _vit_paths(stored_model)
    if len(paths) != 1:
        what = "no custom ViT" if not paths else f"{len(paths)} custom ViTs ({', '.join(p or '<top>' for p in paths)})"
        raise WeightLoadError(
            f"vit.pretrained = {path!r} holds a {stored_model.type!r} model with {what}; point it at a run whose "
            f"model has exactly one vit / vit_backbone."
        )
    source_prefix = paths[0]
    targets = _targets(states, prefix)
    stored = ckpt_lib.stored_model_shapes(step_dir)
    pos_leaf = targets[POS]
    src_pos = source_prefix + POS
    resize = (
        src_pos in stored
        and stored[src_pos][0] != tuple(pos_leaf.shape)
        and _pos_resizable(stored[src_pos][0], tuple(pos_leaf.shape), params.cls_flag)
    )
    work = list(states)
    if resize:  # restore the stored table at its own shape (replicated), then resize it on the host
        sharding = getattr(pos_leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        else:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        stand_in = jax.ShapeDtypeStruct(stored[src_pos][0], np.dtype(pos_leaf.dtype), sharding=sharding)
        work = [ckpt_lib.set_flat_params(s, {prefix + POS: stand_in}) for s in work]
    try:
        work = ckpt_lib.restore_model_weights(step_dir, work, target_prefix=prefix, source_prefix=source_prefix)
    except ckpt_lib.CheckpointError as e:
        raise WeightLoadError(f"vit.pretrained = {path!r} (ViT at {source_prefix or '<top>'!r}): {e}") from e
    if resize:
        restored = next(v for s in work for n, v in ckpt_lib.flat_params(s).items() if n == prefix + POS)
        value = place(_resize_pos(_host(restored), params), pos_leaf)
        work = [ckpt_lib.set_flat_params(s, {prefix + POS: value}) for s in work]
    return work


def _resolve_source(path: str) -> tuple[str, Callable[..., list[Any]]]:
    if paths.is_remote(path):  # s3://, gs://, hf://: a run directory (read in place) or a .safetensors file (copied)
        try:
            if paths.isdir(path):
                return path, load_run
            if path.endswith(".safetensors") and paths.exists(path):
                return paths.local_file(path), load_safetensors
        except paths.PathError as e:
            raise WeightLoadError(f"vit.pretrained: {e}") from None
        raise WeightLoadError(f"vit.pretrained = {path!r} is neither a run directory nor a .safetensors file there.")
    expanded = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(expanded):
        if expanded.endswith(".safetensors"):
            return expanded, load_safetensors
        raise WeightLoadError(f"vit.pretrained = {path!r} is a file but not a .safetensors file.")
    if os.path.isdir(expanded):
        if any(os.path.isdir(os.path.join(expanded, d)) for d in ("checkpoints", "model")) or any(
            d.isdigit() for d in os.listdir(expanded)
        ):
            return expanded, load_run
        files = sorted(f for f in os.listdir(expanded) if f.endswith(".safetensors"))
        if len(files) == 1:
            return os.path.join(expanded, files[0]), load_safetensors
        raise WeightLoadError(
            f"vit.pretrained = {path!r} is a directory with neither our checkpoints nor exactly one .safetensors "
            f"file (found {files or 'none'})."
        )
    raise WeightLoadError(
        f"vit.pretrained = {path!r} does not exist; give an original-format .safetensors file or one of our run "
        f"directories (hub ids are not supported for the custom ViT)."
    )


def load_vit_weights(params: ViTParams, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weight loader for ``vit.pretrained``: ``states`` (nnx.State parts) -> updated states; no-op when unset."""
    if params.pretrained is None:
        return list(states)
    if params.interpolation_mode not in INTERPOLATION_MODES:
        raise WeightLoadError(
            f"{params.gin_name}.interpolation_mode = {params.interpolation_mode!r} is not supported; choose one of "
            f"{list(INTERPOLATION_MODES)}."
        )
    source, loader = _resolve_source(params.pretrained)
    return loader(source, params, states, prefix)
