"""The weight-conversion engine: a tensor source + a table of :class:`Rule` s -> the model's parameters, strictly.

Every outside format (HF decoders, HF SigLIP / CLIP, timm, OpenCLIP, diffusers, the original's ViT files, HF VLMs)
is a declarative table of rules plus small hooks in its own module; this module does the rest once:

* a **source** is a mapping ``name -> NumPy array`` read lazily (``keys()``, ``shape(name)``, ``get(name)``; see
  :mod:`vla_foundry_jax.convert.sources`);
* a :class:`Rule` maps one source name pattern to one parameter path (relative to the (sub-)model) through a
  :class:`Transform`; ``{i}`` in the source name is a layer index: the ``layers`` tensors are stacked on the
  parameter's leading axis. :func:`resolve` turns a static table into concrete rules (``when`` predicates on the
  architecture config, layer counts, source / target prefixes);
* :func:`load_rules` is the one strict loader: it checks every name and shape before reading any data (every source
  tensor consumed unless ``ignore``-d, every parameter under ``prefix`` filled by one rule, every shape equal) and
  raises one :class:`~vla_foundry_jax.checkpoint.Mismatch` report listing the missing, unexpected, mis-shaped and
  unfilled names, worded the same for every source. Then each tensor is read once (a fused tensor serves all its
  rules), converted, cast to the parameter's dtype and placed straight into the target leaf's sharding
  (:func:`place`); a stacked parameter is assembled layer by layer in one aligned host buffer of its dtype (no
  ``np.stack`` copy), so host memory peaks near one parameter plus one source tensor above the placed parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.configs.hf_hub import HFLoadError
from vla_foundry_jax.convert.sources import HOST_ALIGNMENT, aligned_empty

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Transform:
    """A source tensor -> parameter layout change.

    ``apply(value, shape)``: the source value as the (per-layer) parameter of ``shape``; ``source_shape(shape)``:
    the source tensor shape a parameter shape needs (checked before any data is read); ``invert(value)``: the
    parameter value back in the source layout (exports); ``fits(source shape, shape)``: a tolerated difference
    (e.g. a position table ``apply`` resizes); ``part``: ``(j, n)`` when the parameter is slice ``j`` of ``n`` equal
    slices along the source's first axis (a fused projection; an export concatenates the inverted slices)."""

    name: str
    apply: Callable[[np.ndarray, Shape], np.ndarray]
    source_shape: Callable[[Shape], Shape]
    invert: Callable[[np.ndarray], np.ndarray] | None = None
    fits: Callable[[Shape, Shape], bool] | None = None
    part: tuple[int, int] | None = None

    def accepts(self, have: Shape, shape: Shape) -> bool:
        return have == self.source_shape(shape) or (self.fits is not None and self.fits(have, shape))


def _patch_source_shape(shape: Shape) -> Shape:
    p = math.isqrt(shape[0] // 3)
    return (shape[1], 3, p, p)


def _patch_invert(value: np.ndarray) -> np.ndarray:  # [p*p*3, D] -> [D, 3, p, p]
    P, D = value.shape
    p = math.isqrt(P // 3)
    return value.reshape(p, p, 3, D).transpose(3, 2, 0, 1)


def _torch_shape(shape: Shape) -> Shape:
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def _to_flax(value: np.ndarray, shape: Shape = ()) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def _to_torch(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def _leading_ones(shape: Shape) -> Shape:  # timm / the original's [1, 1, D] tokens and [1, N, D] tables
    return (1, 1, *shape) if len(shape) == 1 else (1, *shape)


def _add_one(value: np.ndarray, shape: Shape = ()) -> np.ndarray:
    return value.astype(np.float32) + np.float32(1.0)


def _sub_one(value: np.ndarray) -> np.ndarray:
    return (value.astype(np.float32) - np.float32(1.0)).astype(value.dtype)


COPY = Transform("copy", lambda v, s: v, lambda s: tuple(s), invert=lambda v: v)
# torch Linear weight [out, in] -> kernel [in, out]
TRANSPOSE = Transform("T", lambda v, s: v.T, lambda s: tuple(reversed(s)), invert=lambda v: v.T)
# patch Conv2d weight [D, 3, p, p] -> kernel [p*p*3, D] in the (row, col, channel) order of the towers' patchify
PATCH_CONV = Transform(
    "patch_conv", lambda v, s: v.transpose(2, 3, 1, 0).reshape(-1, v.shape[0]), _patch_source_shape, _patch_invert
)
# torch layout by rank: conv OIHW -> HWIO, Linear [out, in] -> [in, out], vectors as they are
TORCH_LAYOUT = Transform("torch_layout", _to_flax, _torch_shape, invert=_to_torch)
# drop leading unit axes: [1, 1, D] -> [D], [1, N, D] -> [N, D]
SQUEEZE_LEADING = Transform(
    "squeeze_leading", lambda v, s: v.reshape(s), _leading_ones, invert=lambda v: v.reshape(_leading_ones(v.shape))
)
# Gemma's RMSNorm multiplies by (1 + w): the + 1 is folded into our scale (float32, before the dtype cast)
ADD_ONE = Transform("add_one", _add_one, lambda s: tuple(s), invert=_sub_one)


def fused_third(j: int, transpose: bool) -> Transform:
    """Third ``j`` (q, k, v order) of a fused ``[3 * out, ...]`` projection (timm ``qkv``, torch ``in_proj``),
    transposed to a kernel when ``transpose``."""

    def apply(value: np.ndarray, shape: Shape) -> np.ndarray:
        n = value.shape[0] // 3
        part = value[j * n : (j + 1) * n]
        return part.T if transpose else part

    def source_shape(shape: Shape) -> Shape:
        return (3 * shape[1], shape[0]) if transpose else (3 * shape[0],)

    def invert(value: np.ndarray) -> np.ndarray:
        return value.T if transpose else value

    return Transform(f"third{j}{'T' if transpose else ''}", apply, source_shape, invert, part=(j, 3))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter from one source name pattern.

    ``target``: parameter path relative to the (sub-)model; ``source``: source tensor name, ``{i}`` = layer index;
    ``transform``: the layout change; ``layers``: how many ``{i}`` tensors are stacked on the parameter's leading
    axis (set by :func:`resolve` for ``{i}`` rules); ``when``: predicate on the architecture config (None: always).
    """

    target: str
    source: str
    transform: Transform = COPY
    layers: int | None = None
    when: Callable[[Any], bool] | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.source

    def source_names(self) -> list[str]:
        if not self.stacked:
            return [self.source]
        if self.layers is None:
            raise ValueError(f"rule {self.target} <- {self.source}: stacked but the layer count is not resolved.")
        return [self.source.format(i=i) for i in range(self.layers)]


def flag(name: str) -> Callable[[Any], bool]:
    """A ``when`` predicate: the config's boolean field ``name``."""
    return lambda config: bool(getattr(config, name))


def resolve(
    rules: Iterable[Rule],
    config: Any = None,
    *,
    layers: int | None = None,
    source_prefix: str = "",
    target_prefix: str = "",
    transforms: dict[Transform, Transform] | None = None,
) -> list[Rule]:
    """The concrete rules of a static table: those whose ``when(config)`` holds, source / target names prefixed,
    ``{i}`` rules stacked over ``layers`` (unless already set), transforms substituted by ``transforms``."""
    out = []
    for r in rules:
        if r.when is not None and not r.when(config):
            continue
        out.append(
            dataclasses.replace(
                r,
                target=target_prefix + r.target,
                source=source_prefix + r.source,
                transform=(transforms or {}).get(r.transform, r.transform),
                layers=r.layers if r.layers is not None or not r.stacked else layers,
                when=None,
            )
        )
    return out


def find_prefix(keys: Iterable[str], prefixes: Sequence[str], anchor: str, what: str) -> str:
    """The first of ``prefixes`` under which the source holds ``anchor`` (where a sub-model's tensors live)."""
    ks = set(keys)
    for p in prefixes:
        if p + anchor in ks:
            return p
    raise HFLoadError(f"no {what} in the checkpoint (looked for {', '.join(p + anchor for p in prefixes)}).")


def target_leaves(states: Sequence[Any], prefix: str = "") -> dict[str, Any]:
    """``{path relative to prefix: leaf}`` of the parameters under ``prefix`` across the ``nnx.State`` parts."""
    out: dict[str, Any] = {}
    for state in states:
        for name, leaf in ckpt_lib.flat_params(state).items():
            if name.startswith(prefix):
                out[name[len(prefix) :]] = leaf
    return out


def host_buffer(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
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


def place(value: np.ndarray, leaf: Any) -> jax.Array:
    """``value`` with ``leaf``'s dtype, placed in ``leaf``'s sharding (each process supplies its own shards).

    On the CPU backend a single-device placement aliases the (aligned) host buffer instead of copying it, so the
    caller must not write to ``value`` afterwards; ``value`` is the caller's own freshly read / converted buffer.
    """
    dtype = np.dtype(leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and not getattr(leaf, "is_fully_addressable", True):
        value = np.asarray(value).astype(dtype, copy=False)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    value = host_buffer(np.asarray(value), dtype)
    return jax.device_put(value, jax.local_devices()[0] if sharding is None else sharding)


def _layer_shape(rule: Rule, leaf: Any) -> Shape:
    return tuple(leaf.shape[1:] if rule.stacked else leaf.shape)


def check_rules(source: Any, rules: Sequence[Rule], targets: dict[str, Any], ignore: Callable[[str], bool]):
    """The :class:`~vla_foundry_jax.checkpoint.Mismatch` of ``rules`` between ``source`` and ``targets``."""
    full = getattr(source, "full_name", lambda name: name)
    expected: dict[str, tuple[Rule, Shape | None]] = {}
    for rule in rules:
        leaf = targets.get(rule.target)
        for name in rule.source_names():
            expected[name] = (rule, None if leaf is None else _layer_shape(rule, leaf))
    keys = set(source.keys())
    filled = {r.target for r in rules}
    leafless = [r for r in rules if r.target not in targets]
    mismatched = []
    for name, (rule, shape) in sorted(expected.items()):
        if name in keys and shape is not None and not rule.transform.accepts(have := source.shape(name), shape):
            mismatched.append((full(name), have, rule.transform.source_shape(shape)))
    return ckpt_lib.Mismatch(
        missing=[full(n) for n in sorted(set(expected) - keys)],
        unexpected=[full(n) for n in sorted(keys - set(expected)) if not ignore(n)],
        mismatched=mismatched,
        unfilled=sorted(set(targets) - filled) + [f"(rule without parameter) {r.target}" for r in leafless],
    )


CONFIG_HINT = "Is config.json the one these tensors were saved with?"


def load_rules(
    source: Any,
    rules: Sequence[Rule],
    states: Sequence[Any],
    prefix: str = "",
    *,
    where: str,
    ignore: Callable[[str], bool] | None = None,
    noun: str = "checkpoint",
    hint: str | None = CONFIG_HINT,
    error: type[Exception] = HFLoadError,
) -> list[Any]:
    """Fill the parameters under ``prefix`` in ``states`` (``nnx.State`` parts) from ``source`` following ``rules``.

    ``ignore(name)`` marks source tensors that may stay unused. Any other unused tensor, unfilled parameter or shape
    difference raises ``error`` with the :class:`~vla_foundry_jax.checkpoint.Mismatch` report (``where``: what was
    being loaded, e.g. ``"vit_hf.hf_pretrained = 'dir'"``; ``noun``: the source's name in the report; ``hint``: what
    to check). Returns the updated states.
    """
    targets = target_leaves(states, prefix)
    report = check_rules(source, rules, targets, ignore or (lambda name: False))
    if report:
        raise error(report.message(where, noun=noun, hint=hint))
    groups: dict[str, list[Rule]] = {}  # rules reading the same tensors (a fused qkv serves three)
    for rule in rules:
        groups.setdefault(rule.source, []).append(rule)
    values = {}
    for group in groups.values():
        leaves = [targets[r.target] for r in group]
        shapes = [_layer_shape(r, leaf) for r, leaf in zip(group, leaves, strict=True)]
        if group[0].stacked:
            # one aligned host buffer per parameter in its dtype (placed without a copy on CPU); each layer's
            # tensor is read once and converted into the buffers' slices
            out = [aligned_empty(tuple(leaf.shape), np.dtype(leaf.dtype)) for leaf in leaves]
            for i, name in enumerate(group[0].source_names()):
                raw = source.get(name)
                for r, buf, shape in zip(group, out, shapes, strict=True):
                    buf[i] = r.transform.apply(raw, shape)
                del raw
        else:
            raw = source.get(group[0].source)
            out = [r.transform.apply(raw, shape) for r, shape in zip(group, shapes, strict=True)]
            del raw
        for r, value, leaf in zip(group, out, leaves, strict=True):
            values[prefix + r.target] = place(value, leaf)
        del out
    return [ckpt_lib.set_flat_params(state, values) for state in states]
