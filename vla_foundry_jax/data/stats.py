"""Statistics of robotics datasets: ``stats.json`` (the layout ``data.normalization`` reads) from a manifest.

:func:`compute_stats` streams the ``lowdim.npz`` of every sample (shards in parallel, one accumulator per shard,
merged) and writes, per low-dim field ``[T, d]`` (every numeric array of the window except the masks):

* ``count [T]``: valid samples per window row (``past_mask | future_mask``; all rows when a sample has no masks);
* ``mean_per_timestep``, ``std_per_timestep`` (ddof 1; 0 with fewer than 2 values), ``min_per_timestep``,
  ``max_per_timestep`` ``[T, d]`` over the valid values of each row (0 in a row without any);
* ``mean`` (count-weighted mean of the row means = the mean of all valid values), ``std`` (the original's law of
  total variance over rows: ``sqrt(sum_t w_t std_t^2 + sum_t w_t (mean_t - mean)^2)``, ``w_t = count_t / sum
  count``), ``min``, ``max`` ``[d]``;
* ``percentile_{1,2,5,95,98,99}`` ``[d]`` (over all valid values) and ``..._per_timestep`` ``[T, d]``, with NumPy's
  default (linear interpolation) definition; ``percentile_sample_count``; ``tdigest_state*`` = None (no t-digests
  here); ``percentile_error`` (the bound below).

**Exactness.** count / mean / std / min / max are exact (float64 Welford / Chan merges of per-batch moments), so
they match NumPy on the full data to float rounding. Percentiles come from a mergeable relative-error sketch
(:class:`QuantileSketch`, after DDSketch, Masson et al. 2019): each value ``x`` with ``|x| > z`` goes to the
log bucket ``i = ceil(log_g |x|)`` of its sign (``g = (1 + a) / (1 - a)``), ``|x| <= z`` to a zero bucket; a
bucket's representative ``2 g^i / (g + 1)`` is within a relative ``a`` of every value in it. The sketch therefore
knows every order statistic ``x_(k)`` to within ``a |x_(k)| + z``, and interpolating as NumPy does gives
``|estimate - numpy| <= a * max(|x_(k)|, |x_(k+1)|) + z`` (``k = floor((n - 1) p / 100)``), whatever the
distribution or data order. Defaults: ``a = 1e-3`` (``RELATIVE_ERROR``), ``z = 1e-9`` (``ZERO_THRESHOLD``). Memory:
one (code, count) pair per occupied bucket, at most ``ln(max|x| / z) / (2a)`` per sign, slot and field.

The sketches are saved beside stats.json as ``stats_sketch.npz``, so :func:`merge_dataset_stats` merges several
datasets' statistics with weights (counts scaled by each dataset's weight) exactly for mean / std / min / max and
within the same bound for percentiles (a weighted-quantile definition when weights are not 1); without sketch
files percentiles fall back to the count x weight-weighted mean of the files' percentiles (as
``normalization.merge_stats``; approximate).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.data.normalization import PERCENTILES
from vla_foundry_jax.data.shards import DataError, read_manifest, split_member_name

RELATIVE_ERROR = 1e-3
ZERO_THRESHOLD = 1e-9
SKETCH_FILE = "stats_sketch.npz"
MASK_FIELDS = ("past_mask", "future_mask")
_KEY_BITS = 22  # code = slot << 22 | (key + 2^21); |key| < 2^21
_K0 = 1 << 20  # bucket index offset: |i| < 2^20


class StatsError(DataError):
    """Statistics that cannot be computed or merged; the message names the file / field and the fix."""


# ---------------------------------------------------------------- the quantile sketch


class QuantileSketch:
    """Relative-error quantile sketch over ``num_slots`` independent streams (see the module docstring).

    State: sorted unique int64 ``codes`` (slot and signed bucket) and float64 ``counts``; ``add`` / ``merge`` are
    exact (counts add), so the result does not depend on how the data was split or ordered.
    """

    def __init__(
        self, num_slots: int, relative_error: float = RELATIVE_ERROR, zero_threshold: float = ZERO_THRESHOLD
    ) -> None:
        if not 0 < relative_error < 1:
            raise StatsError(f"relative_error must be in (0, 1), got {relative_error}.")
        self.num_slots = int(num_slots)
        self.relative_error = float(relative_error)
        self.zero_threshold = float(zero_threshold)
        self.gamma = (1 + relative_error) / (1 - relative_error)
        self._log_gamma = math.log(self.gamma)
        self.codes = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.float64)

    def _keys(self, values: np.ndarray) -> np.ndarray:
        mag = np.abs(values)
        big = mag > self.zero_threshold
        idx = np.zeros(values.shape, np.int64)
        idx[big] = np.ceil(np.log(mag[big]) / self._log_gamma).astype(np.int64)
        # float rounding of the log can put a value one bucket off at a bucket edge: fix it exactly
        if big.any():
            lo = np.power(self.gamma, idx[big] - 1.0)
            hi = np.power(self.gamma, idx[big].astype(np.float64))
            sub = idx[big]
            sub = np.where(mag[big] <= lo, sub - 1, np.where(mag[big] > hi, sub + 1, sub))
            idx[big] = sub
        if (np.abs(idx) >= _K0).any():
            raise StatsError(f"values out of the sketch's range (|x| up to {mag.max():.3g}).")
        return np.where(big, np.sign(values).astype(np.int64) * (idx + _K0), 0)

    def add(self, slots: np.ndarray, values: np.ndarray, weight: float = 1.0) -> None:
        values = np.asarray(values, np.float64).reshape(-1)
        slots = np.asarray(slots, np.int64).reshape(-1)
        if values.size == 0:
            return
        codes = (slots << _KEY_BITS) | (self._keys(values) + (1 << (_KEY_BITS - 1)))
        uniq, cnt = np.unique(codes, return_counts=True)
        self._combine(uniq, cnt.astype(np.float64) * weight)

    def _combine(self, codes: np.ndarray, counts: np.ndarray) -> None:
        if self.codes.size == 0:
            self.codes, self.counts = codes.copy(), counts.copy()
            return
        all_codes = np.concatenate([self.codes, codes])
        uniq, inv = np.unique(all_codes, return_inverse=True)
        self.counts = np.bincount(inv, weights=np.concatenate([self.counts, counts]), minlength=uniq.size)
        self.codes = uniq

    def merge(self, other: QuantileSketch, weight: float = 1.0) -> None:
        if (other.num_slots, other.relative_error, other.zero_threshold) != (
            self.num_slots,
            self.relative_error,
            self.zero_threshold,
        ):
            raise StatsError(
                "cannot merge quantile sketches of different shapes or accuracies "
                f"({other.num_slots}, {other.relative_error}, {other.zero_threshold}) vs "
                f"({self.num_slots}, {self.relative_error}, {self.zero_threshold})."
            )
        if other.codes.size:
            self._combine(other.codes, other.counts * weight)

    def _value(self, codes: np.ndarray) -> np.ndarray:
        key = (codes & ((1 << _KEY_BITS) - 1)) - (1 << (_KEY_BITS - 1))
        i = np.abs(key) - _K0
        rep = 2.0 * np.power(self.gamma, i.astype(np.float64)) / (self.gamma + 1.0)
        return np.where(key == 0, 0.0, np.sign(key) * rep)

    def slot_counts(self) -> np.ndarray:
        return np.bincount(self.codes >> _KEY_BITS, weights=self.counts, minlength=self.num_slots)

    def quantiles(self, percentiles: Sequence[float]) -> np.ndarray:
        """``[num_slots, len(percentiles)]``: NumPy-style (linear) percentiles per slot; 0 for an empty slot."""
        out = np.zeros((self.num_slots, len(percentiles)))
        if self.codes.size == 0:
            return out
        n = self.slot_counts()
        cum = np.cumsum(self.counts)
        before = np.concatenate([[0.0], np.cumsum(n)[:-1]])  # cumulative count before each slot
        values = self._value(self.codes)
        for j, p in enumerate(percentiles):
            h = np.maximum(n - 1, 0) * (p / 100.0)
            k = np.floor(h)
            frac = h - k
            k1 = np.minimum(k + 1, np.maximum(n - 1, 0))
            lo = values[np.minimum(np.searchsorted(cum, before + k, side="right"), cum.size - 1)]
            hi = values[np.minimum(np.searchsorted(cum, before + k1, side="right"), cum.size - 1)]
            out[:, j] = np.where(n > 0, lo + frac * (hi - lo), 0.0)
        return out


# ---------------------------------------------------------------- per-field accumulator


class FieldAccumulator:
    """Exact moments / extrema per window row and the quantile sketch of one field ``[T, d]``.

    Sketch slots: ``t * d + j`` per row and feature, ``T * d + j`` for all rows together (the global percentiles).
    """

    def __init__(self, steps: int, dim: int, relative_error: float = RELATIVE_ERROR) -> None:
        self.steps, self.dim = int(steps), int(dim)
        self.n = np.zeros(steps)
        self.mean = np.zeros((steps, dim))
        self.m2 = np.zeros((steps, dim))
        self.min = np.full((steps, dim), np.inf)
        self.max = np.full((steps, dim), -np.inf)
        self.sketch = QuantileSketch((steps + 1) * dim, relative_error)

    def update(self, x: np.ndarray, mask: np.ndarray) -> None:
        """``x [n, T, d]`` float64, ``mask [n, T]`` bool (valid rows)."""
        x = np.asarray(x, np.float64)
        m = mask[..., None]
        n_b = mask.sum(0).astype(np.float64)  # [T]
        safe = np.maximum(n_b, 1)[:, None]
        mean_b = np.where(m, x, 0.0).sum(0) / safe
        m2_b = np.where(m, (x - mean_b) ** 2, 0.0).sum(0)
        self._chan(n_b, mean_b, m2_b)
        self.min = np.minimum(self.min, np.where(m, x, np.inf).min(0))
        self.max = np.maximum(self.max, np.where(m, x, -np.inf).max(0))
        rows, steps = np.nonzero(mask)
        vals = x[rows, steps]  # [m, d]
        feat = np.arange(self.dim)[None, :]
        self.sketch.add(steps[:, None] * self.dim + feat, vals)
        self.sketch.add(np.broadcast_to(self.steps * self.dim + feat, vals.shape), vals)

    def _chan(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.n
        tot = n_a + n_b
        safe = np.maximum(tot, 1e-300)[:, None]
        delta = mean_b - self.mean
        self.mean = np.where(tot[:, None] > 0, self.mean + delta * (n_b[:, None] / safe), 0.0)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b)[:, None] / safe
        self.n = tot

    def merge(self, other: FieldAccumulator, weight: float = 1.0) -> None:
        if (other.steps, other.dim) != (self.steps, self.dim):
            raise StatsError(
                f"window / feature sizes differ: [{other.steps}, {other.dim}] vs [{self.steps}, {self.dim}]."
            )
        self._chan(other.n * weight, other.mean, other.m2 * weight)
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        self.sketch.merge(other.sketch, weight)

    def to_stats(self) -> dict[str, Any]:
        n = self.n
        has = n > 0
        var_t = np.where((n > 1)[:, None], self.m2 / np.maximum(n - 1, 1)[:, None], 0.0)
        std_t = np.sqrt(np.maximum(var_t, 0.0))
        w = n / max(n.sum(), 1e-300)
        mean = (w[:, None] * self.mean).sum(0)
        std = np.sqrt(np.maximum((w[:, None] * var_t).sum(0) + (w[:, None] * (self.mean - mean) ** 2).sum(0), 0.0))
        min_t = np.where(has[:, None], self.min, 0.0)
        max_t = np.where(has[:, None], self.max, 0.0)
        q = self.sketch.quantiles(PERCENTILES)  # [(T + 1) * d, P]
        q_t = q[: self.steps * self.dim].reshape(self.steps, self.dim, -1)
        q_g = q[self.steps * self.dim :]
        entry: dict[str, Any] = {
            "mean": mean,
            "std": std,
            "min": self.min[has].min(0) if has.any() else np.zeros(self.dim),
            "max": self.max[has].max(0) if has.any() else np.zeros(self.dim),
            "mean_per_timestep": self.mean,
            "std_per_timestep": std_t,
            "min_per_timestep": min_t,
            "max_per_timestep": max_t,
        }
        for i, p in enumerate(PERCENTILES):
            entry[f"percentile_{p}"] = q_g[:, i]
        entry["percentile_sample_count"] = n
        entry["tdigest_state"] = None
        for i, p in enumerate(PERCENTILES):
            entry[f"percentile_{p}_per_timestep"] = q_t[:, :, i]
        entry["tdigest_state_per_timestep"] = None
        entry["count"] = n
        out = {k: (None if v is None else np.asarray(v, np.float64).tolist()) for k, v in entry.items()}
        out["percentile_error"] = {
            "method": "relative-error log buckets (DDSketch); |est - numpy| <= a * max(|x_(k)|, |x_(k+1)|) + z",
            "relative_error": self.sketch.relative_error,
            "zero_threshold": self.sketch.zero_threshold,
        }
        return out

    @classmethod
    def from_stats(cls, entry: dict[str, Any], sketch: dict[str, np.ndarray] | None, where: str) -> FieldAccumulator:
        """Rebuild the exact accumulator of a stats.json entry (and its sketch arrays, when saved)."""
        try:
            n = np.asarray(entry["count"], np.float64)
            mean = np.asarray(entry["mean_per_timestep"], np.float64)
            std = np.asarray(entry["std_per_timestep"], np.float64)
            mn = np.asarray(entry["min_per_timestep"], np.float64)
            mx = np.asarray(entry["max_per_timestep"], np.float64)
        except KeyError as e:
            raise StatsError(f"{where} lacks {e.args[0]!r}; recompute it with launch.compute_stats.") from None
        rel = float((entry.get("percentile_error") or {}).get("relative_error", RELATIVE_ERROR))
        acc = cls(mean.shape[0], mean.shape[1], rel)
        acc.n, acc.mean = n, mean
        acc.m2 = std**2 * np.maximum(n - 1, 0)[:, None]
        acc.min = np.where((n > 0)[:, None], mn, np.inf)
        acc.max = np.where((n > 0)[:, None], mx, -np.inf)
        if sketch is not None:
            acc.sketch.codes = np.asarray(sketch["codes"], np.int64)
            acc.sketch.counts = np.asarray(sketch["counts"], np.float64)
        return acc


# ---------------------------------------------------------------- reading shards


def _window_arrays(raw: bytes, where: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError) as e:
        raise StatsError(f"{where}: cannot read lowdim.npz: {e}") from e
    masks = [arrays.pop(k).reshape(-1).astype(bool) for k in MASK_FIELDS if k in arrays]
    mask = (masks[0] | masks[1]) if len(masks) == 2 else (masks[0] if masks else None)
    return arrays, mask


def shard_accumulators(
    path: str, fields: Sequence[str] | None = None, relative_error: float = RELATIVE_ERROR
) -> tuple[dict[str, FieldAccumulator], int]:
    """Accumulators of every (or the named) numeric low-dim field over the samples of one tar shard."""
    per_field: dict[str, list[np.ndarray]] = {}
    masks: list[np.ndarray] = []
    n = 0
    try:
        source = {"fileobj": io.BytesIO(paths.read_bytes(path))} if paths.is_remote(path) else {"name": path}
        with tarfile.open(mode="r:", **source) as tar:
            for info in tar:
                split = split_member_name(info.name) if info.isfile() else None
                if split is None or not split[1].endswith("lowdim.npz"):
                    continue
                where = f"sample {split[0]!r} of {path}"
                arrays, mask = _window_arrays(tar.extractfile(info).read(), where)
                names = list(fields) if fields else sorted(arrays)
                steps = None
                for name in names:
                    if name not in arrays:
                        if fields:
                            raise StatsError(f"{where}: field {name!r} is not in lowdim.npz ({sorted(arrays)}).")
                        continue
                    a = arrays[name]
                    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or a.ndim == 0:
                        continue
                    a = a.reshape(a.shape[0], -1).astype(np.float64)
                    if not np.isfinite(a).all():
                        raise StatsError(
                            f"{where}: field {name!r} holds NaN / inf; fix the data (the converter rejects NaN) "
                            "before computing statistics."
                        )
                    steps = a.shape[0] if steps is None else steps
                    per_field.setdefault(name, []).append(a)
                T = steps or 0
                masks.append(np.ones(T, bool) if mask is None else mask)
                n += 1
    except tarfile.TarError as e:
        raise StatsError(f"cannot read shard {path}: {e}") from e
    out = {}
    for name, arrays in per_field.items():
        shapes = {a.shape for a in arrays}
        if len(arrays) != n or len(shapes) != 1:
            raise StatsError(
                f"{path}: field {name!r} has windows of different shapes {sorted(shapes)} (or is missing from some "
                "samples); statistics need one window shape per field."
            )
        x = np.stack(arrays)
        mask = np.stack(masks)
        if mask.shape[1] != x.shape[1]:
            raise StatsError(f"{path}: field {name!r} has {x.shape[1]} rows but the masks {mask.shape[1]}.")
        acc = FieldAccumulator(x.shape[1], x.shape[2], relative_error)
        acc.update(x, mask)
        out[name] = acc
    return out, n


def _shard_job(args: tuple) -> tuple[dict[str, FieldAccumulator], int]:
    return shard_accumulators(*args)


def accumulate_shards(
    paths: Sequence[str],
    *,
    fields: Sequence[str] | None = None,
    num_workers: int = 1,
    relative_error: float = RELATIVE_ERROR,
    progress: bool = False,
) -> tuple[dict[str, FieldAccumulator], int]:
    """Merged accumulators over tar shards (``num_workers`` processes; merging is exact and order-free)."""
    jobs = [(p, tuple(fields) if fields else None, relative_error) for p in paths]
    total: dict[str, FieldAccumulator] = {}
    count = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="shard", desc="stats")

    def add(result: tuple[dict[str, FieldAccumulator], int]) -> None:
        nonlocal count
        accs, n = result
        count += n
        for name, acc in accs.items():
            if name in total:
                try:
                    total[name].merge(acc)
                except StatsError as e:
                    raise StatsError(f"field {name!r}: {e}") from None
            else:
                total[name] = acc
        if bar is not None:
            bar.update(1)

    if num_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            add(_shard_job(job))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(jobs)), mp_context=ctx) as pool:
            for result in pool.map(_shard_job, jobs):
                add(result)
    if bar is not None:
        bar.close()
    return total, count


# ---------------------------------------------------------------- files


def save_stats(accs: dict[str, FieldAccumulator], stats_path: str) -> dict[str, Any]:
    """Write stats.json and its ``stats_sketch.npz`` beside it (each atomically, local or on object storage)."""
    stats = {name: accs[name].to_stats() for name in sorted(accs)}
    arrays = {}
    for name, acc in accs.items():
        arrays[f"{name}/codes"] = acc.sketch.codes
        arrays[f"{name}/counts"] = acc.sketch.counts
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(paths.join(paths.dirname(stats_path), SKETCH_FILE), buf.getvalue())
    paths.write_text(stats_path, json.dumps(stats, separators=(",", ":")))
    return stats


def compute_stats(
    manifest: str,
    *,
    output: str | None = None,
    fields: Sequence[str] | None = None,
    num_workers: int = 1,
    relative_error: float = RELATIVE_ERROR,
    progress: bool = False,
) -> dict[str, Any]:
    """stats.json of the dataset at ``manifest`` (written to ``output``, default beside the manifest); returns it."""
    entries = read_manifest(manifest)
    missing = [e.path for e in entries if not paths.exists(e.path)]
    if missing:
        raise StatsError(f"shard {missing[0]} listed in {manifest} does not exist.")
    accs, n = accumulate_shards(
        [e.path for e in entries], fields=fields, num_workers=num_workers, relative_error=relative_error,
        progress=progress,
    )  # fmt: skip
    if n == 0 or not accs:
        raise StatsError(f"{manifest}: no samples with numeric lowdim.npz fields; is this robotics data?")
    return save_stats(accs, output or paths.join(paths.dirname(manifest), "stats.json"))


def load_sketches(stats_path: str) -> dict[str, dict[str, np.ndarray]] | None:
    """The ``stats_sketch.npz`` beside ``stats_path`` as ``{field: {"codes", "counts"}}``, or None."""
    path = paths.join(paths.dirname(stats_path), SKETCH_FILE)
    if not paths.exists(path):
        return None
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as npz:
        for key in npz.files:
            field, _, part = key.rpartition("/")
            out.setdefault(field, {})[part] = np.asarray(npz[key])
    return out


def merge_dataset_stats(
    stats_paths: Sequence[str], weights: Sequence[float] | None = None, *, output: str | None = None
) -> dict[str, Any]:
    """Merge several datasets' stats.json with ``weights`` (default 1 each: the stats of the datasets together).

    A dataset's counts are scaled by its weight. Fields missing from any dataset are dropped (as the original).
    Percentiles merge through the saved sketches when every dataset has one (else the weighted mean of the
    percentiles, marked ``"percentile_error": {"method": "weighted mean of percentiles (approximate)"}``).
    Writes ``output`` (and its sketch) when given, with the inputs' ``preprocessing_config.yaml`` beside it when
    they agree on the window (so the merged file can be the one ``robotics.dataset_statistics`` entry).
    """
    from vla_foundry_jax.data.normalization import load_stats

    if not stats_paths:
        raise StatsError("no stats.json files to merge.")
    weights = [1.0] * len(stats_paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(stats_paths):
        raise StatsError(f"{len(weights)} weights for {len(stats_paths)} stats files; give one weight per file.")
    if any(w <= 0 or not math.isfinite(w) for w in weights):
        raise StatsError(f"weights must be positive, got {weights}.")
    loaded = [load_stats(p, what="merge_dataset_stats") for p in stats_paths]
    sketches = [load_sketches(p) for p in stats_paths]
    fields = sorted(set.intersection(*(set(s) for s in loaded)))
    accs: dict[str, FieldAccumulator] = {}
    approximate = []
    for field in fields:
        have_sketch = all(s is not None and field in s for s in sketches)
        parts = [
            FieldAccumulator.from_stats(s[field], sk[field] if have_sketch else None, f"{p} field {field!r}")
            for s, sk, p in zip(loaded, sketches, stats_paths, strict=True)
        ]
        acc = parts[0]
        acc.n, acc.m2 = acc.n * weights[0], acc.m2 * weights[0]
        acc.sketch.counts = acc.sketch.counts * weights[0]
        for part, w, path in zip(parts[1:], weights[1:], stats_paths[1:], strict=True):
            try:
                acc.merge(part, w)
            except StatsError as e:
                raise StatsError(f"cannot merge field {field!r} of {path}: {e}") from None
        accs[field] = acc
        if not have_sketch:
            approximate.append(field)
    if output is not None:
        stats = save_stats(accs, output)
    else:
        stats = {name: accs[name].to_stats() for name in sorted(accs)}
    for field in approximate:  # no sketches: weighted mean of the files' percentiles
        entry = stats[field]
        counts = np.stack([np.asarray(s[field]["count"], np.float64) * w for s, w in zip(loaded, weights, strict=True)])
        ds_w = (counts.sum(1) / max(counts.sum(), 1e-300))[:, None]
        step_w = (counts / np.maximum(counts.sum(0), 1e-300))[..., None]
        for p in PERCENTILES:
            for key, wts in ((f"percentile_{p}", ds_w), (f"percentile_{p}_per_timestep", step_w)):
                vals = [s[field].get(key) for s in loaded]
                if all(v is not None for v in vals):
                    entry[key] = (wts * np.stack([np.asarray(v, np.float64) for v in vals])).sum(0).tolist()
        entry["percentile_error"] = {"method": "weighted mean of percentiles (approximate; no stats_sketch.npz)"}
    if output is not None and approximate:
        paths.write_text(output, json.dumps(stats, separators=(",", ":")))
    if output is not None:
        _copy_preprocessing_config(stats_paths, output)
    return stats


def _copy_preprocessing_config(stats_paths: Sequence[str], output: str) -> None:
    """Put the inputs' preprocessing_config.yaml beside a merged stats.json when they agree on the window (the
    robotics data reads the stats' window from it); otherwise leave it to normalization.lowdim_*_timesteps."""
    import yaml

    configs = []
    for path in stats_paths:
        cfg_path = paths.join(paths.dirname(path), "preprocessing_config.yaml")
        if not paths.exists(cfg_path):
            return
        text = paths.read_text(cfg_path)
        cfg = yaml.safe_load(text) or {}
        configs.append((text, {k: cfg.get(k) for k in ("past_lowdim_steps", "future_lowdim_steps")}))
    target = paths.join(paths.dirname(output), "preprocessing_config.yaml")
    if all(c == configs[0][1] for _, c in configs) and not paths.exists(target):
        paths.write_text(target, configs[0][0])
