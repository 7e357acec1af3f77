"""Normalisation of robotics lowdim fields from ``stats.json`` (the original's ``RoboticsNormalizer``), in numpy.

stats.json (written beside each manifest by the preprocessing, and by ``testbeds.tiny_robotics``) maps each lowdim
field to its statistics over the dataset's sample windows: ``mean, std, min, max, percentile_{1,2,5,95,98,99}``
(length ``d``, over all valid timesteps), the same names with ``_per_timestep`` (``[T_stats, d]``, one row per
window position; the current step is row ``normalization.lowdim_past_timesteps``), ``count`` (``[T_stats]`` valid
samples per row) and, from the original's preprocessing, t-digest states we do not read.

Per field, ``(center, scale)``: ``std`` -> (mean, std); ``percentile_5_95`` -> (p5, p95 - p5); ``percentile_1_99``
-> (p1, p99 - p1); ``min_max`` -> (min, max - min). With ``normalization.centered_norm`` (forced on when the
default method is ``std``) a percentile / min-max field is centred: ``center += scale / 2; scale /= 2``, mapping
the range to [-1, 1]. Then ``scale = max(scale, epsilon)``; ``x_n = (x - center) / scale``, ``x = x_n * scale +
center``. Only fields in ``normalization.include_fields`` whose name holds none of text / language / instruction /
mask / valid, with normalisation enabled (globally and for the field), are changed; others pass through.

Per-timestep scope: a window ``x [..., T, d]`` whose current step is row ``anchor`` uses stats rows
``stats_past - anchor + j`` for ``j = 0..T-1`` (``stats_past = normalization.lowdim_past_timesteps``). Normalising
a window the stats do not cover raises; denormalising clamps the rows to the stats (edge rows repeat), so a
longer predicted horizon can still be mapped back. (The original's denormalise crops instead and then fails on
the shape mismatch; its normalise treats a window as aligned whenever ``T == T_stats``, which differs only for a
non-default anchor.)

Several stats files are merged as the original does: counts summed, per-timestep means count-weighted, per-
timestep std by the pooled-variance formula, global mean / std from the per-timestep ones (law of total
variance), min / max exact. Percentiles: the original merges t-digest states; here they are count-weighted means
of the files' percentiles (exact only when the datasets share a distribution; documented approximation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.data.shards import DataError

PERCENTILES = (1, 2, 5, 95, 98, 99)
_SKIP_WORDS = ("text", "language", "instruction", "mask", "valid")
_METHOD_KEYS = {
    "std": ("mean", "std"),
    "percentile_5_95": ("percentile_5", "percentile_95"),
    "percentile_1_99": ("percentile_1", "percentile_99"),
    "min_max": ("min", "max"),
}


def load_stats(path: str, *, what: str = "robotics.dataset_statistics") -> dict[str, Any]:
    """Read one stats.json; a missing or unreadable file raises ``DataError`` naming ``what``."""
    try:
        found = paths.exists(path)
    except paths.PathError as e:
        raise DataError(f"{what}: {e}") from None
    if not found:
        raise DataError(
            f"Robotics statistics file {path!r} not found (cwd {os.getcwd()!r}); check {what}: one stats.json per "
            "dataset, written beside its manifest.jsonl by the preprocessing."
        )
    try:
        stats = json.loads(paths.read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"Cannot read robotics statistics {path!r} ({what}): {e}") from e
    if not isinstance(stats, dict):
        raise DataError(f"Robotics statistics {path!r} ({what}) must map field names to statistics, got a list.")
    return stats


def _arr(stats: dict[str, Any], key: str) -> np.ndarray | None:
    v = stats.get(key)
    return None if v is None else np.asarray(v, np.float64)


def merge_stats(stats_list: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the stats of several datasets field by field (see the module docstring). One file is returned as is."""
    if len(stats_list) == 1:
        return stats_list[0]
    fields = sorted(set().union(*(s.keys() for s in stats_list)))
    merged: dict[str, Any] = {}
    for field in fields:
        parts = [s[field] for s in stats_list if field in s]
        if len(parts) != len(stats_list):
            continue  # the original keeps only what every dataset has for merged fields
        try:
            merged[field] = _merge_field(parts)
        except (KeyError, ValueError) as e:
            raise DataError(
                f"Cannot merge the statistics of field {field!r} across datasets (different window lengths or "
                f"feature sizes?): {e}"
            ) from e
    return merged


def _merge_field(parts: list[dict[str, Any]]) -> dict[str, Any]:
    counts = np.stack([np.asarray(p["count"], np.float64) for p in parts])  # [n, T]
    means_t = np.stack([_arr(p, "mean_per_timestep") for p in parts])  # [n, T, d]
    stds_t = np.stack([_arr(p, "std_per_timestep") for p in parts])
    total_t = counts.sum(0)  # [T]
    w = counts[..., None]
    mean_t = (w * means_t).sum(0) / np.maximum(total_t, 1)[:, None]
    pooled = ((w - 1) * stds_t**2 + w * (means_t - mean_t) ** 2).sum(0) / np.maximum(total_t - 1, 1)[:, None]
    std_t = np.sqrt(pooled)
    out: dict[str, Any] = {
        "mean_per_timestep": mean_t,
        "std_per_timestep": std_t,
        "min_per_timestep": np.min([_arr(p, "min_per_timestep") for p in parts], 0),
        "max_per_timestep": np.max([_arr(p, "max_per_timestep") for p in parts], 0),
        "min": np.min([_arr(p, "min") for p in parts], 0),
        "max": np.max([_arr(p, "max") for p in parts], 0),
        "count": total_t,
    }
    tw = total_t / max(total_t.sum(), 1)
    out["mean"] = (tw[:, None] * mean_t).sum(0)
    out["std"] = np.sqrt((tw[:, None] * std_t**2).sum(0) + (tw[:, None] * (mean_t - out["mean"]) ** 2).sum(0))
    dataset_w = (counts.sum(1) / max(counts.sum(), 1))[:, None]  # [n, 1]
    step_w = (counts / np.maximum(total_t, 1))[..., None]  # [n, T, 1]
    for p in PERCENTILES:
        for key, weights in ((f"percentile_{p}", dataset_w), (f"percentile_{p}_per_timestep", step_w)):
            vals = [_arr(q, key) for q in parts]
            if all(v is not None for v in vals):
                out[key] = (weights * np.stack(vals)).sum(0)
    return {k: np.asarray(v).tolist() for k, v in out.items()}


class Normalizer:
    """Per-field ``(center, scale)`` from merged stats and the normalisation params; numpy in, numpy out.

    Build it with :meth:`from_stats`. ``normalize(field, x, anchor)`` / ``denormalize(field, x, anchor)`` take
    ``x [..., T, d]`` (per-timestep scope) or ``[..., d]`` (global); ``anchor`` is the row of ``x`` holding the
    current step (default: the data's ``lowdim_past_timesteps``). ``denormalize_actions(actions [..., Ta, A])``
    splits ``A`` by the action fields, denormalises each and concatenates again.
    """

    def __init__(self, stats: dict[str, Any], data: Any) -> None:
        self.stats = stats
        self.data = data
        self.params = data.normalization
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, str] | None] = {}

    @classmethod
    def from_stats(cls, stats_paths_or_dict: str | Sequence[str] | dict | Sequence[dict], data: Any) -> Normalizer:
        """``stats_paths_or_dict``: a stats.json path, a list of paths, a stats dict or a list of dicts (merged)."""
        src = stats_paths_or_dict
        items = [src] if isinstance(src, (str, dict)) else list(src)
        if not items:
            raise DataError("No robotics statistics given: set robotics.dataset_statistics (stats.json paths).")
        loaded = [load_stats(s) if isinstance(s, str) else s for s in items]
        return cls(merge_stats(loaded), data)

    def field_dim(self, field: str) -> int:
        """Feature size of ``field`` (length of its ``mean``); unknown fields raise ``DataError``."""
        if field not in self.stats or "mean" not in self.stats[field]:
            raise DataError(
                f"Field {field!r} is not in the robotics statistics (robotics.dataset_statistics); fields there: "
                f"{sorted(self.stats)}."
            )
        return len(self.stats[field]["mean"])

    def should_normalize(self, field: str) -> bool:
        p = self.params
        if not p.enabled or not p.field_config(field).enabled or field not in p.include_fields:
            return False
        return not any(w in field.lower() for w in _SKIP_WORDS)

    def center_scale(self, field: str) -> tuple[np.ndarray, np.ndarray, str] | None:
        """``(center, scale, scope)`` float32 (``[d]`` or ``[T_stats, d]``), or None when ``field`` passes through."""
        if field in self._cache:
            return self._cache[field]
        out = None
        if self.should_normalize(field):
            self.field_dim(field)
            cfg = self.params.field_config(field)
            lo_key, hi_key = _METHOD_KEYS[cfg.method]
            suffix = "_per_timestep" if cfg.scope == "per_timestep" else ""
            stats = self.stats[field]
            lo, hi = _arr(stats, lo_key + suffix), _arr(stats, hi_key + suffix)
            if lo is None or hi is None:
                raise DataError(
                    f"The robotics statistics of {field!r} lack {lo_key + suffix!r} / {hi_key + suffix!r}, needed by "
                    f"normalization method {cfg.method!r} (scope {cfg.scope!r}); choose another method for this field "
                    "in normalization.field_configs or recompute stats.json."
                )
            if cfg.method == "std":
                center, scale = lo, hi
            else:
                center, scale = lo, hi - lo
                if self.params.centered_norm:
                    center, scale = center + 0.5 * scale, 0.5 * scale
            scale = np.maximum(scale, cfg.epsilon)
            out = (center.astype(np.float32), scale.astype(np.float32), cfg.scope)
        self._cache[field] = out
        return out

    def _aligned(self, field: str, center: np.ndarray, scale: np.ndarray, steps: int, anchor: int, clamp: bool):
        stats_past = self.params.lowdim_past_timesteps
        if stats_past is None:
            if steps != center.shape[0]:
                raise DataError(
                    f"Per-timestep normalisation of {field!r}: a {steps}-step window cannot be aligned with the "
                    f"{center.shape[0]}-step stats without normalization.lowdim_past_timesteps (resolve the data "
                    "params first: data.robotics.resolve_robotics_data)."
                )
            return center, scale
        rows = stats_past - anchor + np.arange(steps)
        if rows[0] < 0 or rows[-1] >= center.shape[0]:
            if not clamp:
                raise DataError(
                    f"Per-timestep normalisation of {field!r}: a window of {steps} steps with the current step at row "
                    f"{anchor} needs stats rows {rows[0]}..{rows[-1]}, but the stats hold rows "
                    f"0..{center.shape[0] - 1} (current step at {stats_past}); lower "
                    "robotics.lowdim_past/future_timesteps."
                )
            rows = np.clip(rows, 0, center.shape[0] - 1)
        return center[rows], scale[rows]

    def _params_for(self, field: str, x: np.ndarray, anchor: int | None, clamp: bool):
        cs = self.center_scale(field)
        if cs is None:
            return None
        center, scale, scope = cs
        if scope == "per_timestep" and x.ndim >= 2:
            if anchor is None:
                anchor = self.data.lowdim_past_timesteps or 0
            center, scale = self._aligned(field, center, scale, x.shape[-2], anchor, clamp)
        elif scope == "per_timestep":
            stats_past = self.params.lowdim_past_timesteps or 0
            center, scale = center[stats_past], scale[stats_past]
        if x.shape[-1] != center.shape[-1]:
            raise DataError(
                f"Field {field!r} has {x.shape[-1]} features but its statistics have {center.shape[-1]}; the stats "
                "do not describe this dataset (robotics.dataset_statistics)."
            )
        return center, scale

    def normalize(self, field: str, x: np.ndarray, anchor: int | None = None) -> np.ndarray:
        """``(x - center) / scale`` as float32 (``x`` unchanged but cast when the field is not normalised)."""
        x = np.asarray(x, np.float32)
        cs = self._params_for(field, x, anchor, clamp=False)
        return x if cs is None else (x - cs[0]) / cs[1]

    def denormalize(self, field: str, x: np.ndarray, anchor: int | None = None) -> np.ndarray:
        """``x * scale + center`` as float32; per-timestep rows beyond the stats repeat the edge rows."""
        x = np.asarray(x, np.float32)
        cs = self._params_for(field, x, anchor, clamp=True)
        return x if cs is None else x * cs[1] + cs[0]

    def denormalize_actions(self, actions: np.ndarray, anchor: int | None = None) -> np.ndarray:
        """Normalised ``actions [..., Ta, A]`` (the action fields concatenated) -> raw units, same shape."""
        actions = np.asarray(actions, np.float32)
        dims = [self.field_dim(f) for f in self.data.action_fields]
        if actions.shape[-1] != sum(dims):
            raise DataError(
                f"actions have {actions.shape[-1]} features but the action fields {list(self.data.action_fields)} "
                f"have {sum(dims)} ({dims})."
            )
        parts = np.split(actions, np.cumsum(dims)[:-1], axis=-1)
        out = [self.denormalize(f, p, anchor) for f, p in zip(self.data.action_fields, parts, strict=True)]
        return np.concatenate(out, axis=-1)
