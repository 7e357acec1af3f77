"""One policy for bad samples, in every modality: skip, warn, count, and stop past a budget.

A *bad sample* is one whose bytes cannot be used: a truncated or corrupt ``json.gz`` (``text``), text that is
not UTF-8 or a ``json`` member that is not valid JSON / has no ``text`` (``text_untokenized``), an image PIL
cannot decode or a missing caption / image (``image_caption``), a missing or unreadable ``lowdim.npz`` /
``metadata.json``, a missing or undecodable image (``robotics``), or a tar member cut short. The readers raise
``BadSampleError`` (naming shard and key) for those; everything else (a config that does not fit the data, a
crop larger than the image) stays a hard ``DataError``.

Policy (``SkipBadSamples``, wrapped around each manifest's transformed dataset, and ``TrainIterator``):

* **skip**: element ``i`` whose sample is bad is replaced by element ``i + 1`` (then ``i + 2``, ...) of the same
  dataset (after shuffling, with that element's own per-index random stream), so batches stay full and the
  replacement is fixed by the data seed: a resumed run reads exactly the same samples;
* **warn**: one warning line per shard, at its first bad sample, naming the shard file, the sample key and
  why; later ones are counted only. The iterator logs a summary (count, fraction, shards) when it finishes;
* **count**: every element carries the number of bad samples skipped to fill it (``BAD_SAMPLES_KEY``) and a
  note naming the first of them (``BAD_SAMPLE_NOTE_KEY``); the iterators pop both and add up, so
  ``TrainIterator.bad_samples`` is exact per batch, deterministic, and saved in the iterator state. It counts
  skips: a bad sample right after another bad one is met by both elements and counted twice, so clustered bad
  samples count a little high, never low;
* **stop**: once the skipped count passes ``data.max_bad_sample_fraction`` of the samples the run trains on
  (this host's rows of all its batches), the iterator raises one ``DataError`` naming the field, the count,
  the shards and the first reason. So a run never finishes having skipped more than that fraction, and a mostly
  broken dataset stops after at most that many bad samples. ``MAX_CONSECUTIVE_BAD`` bad samples in a row stop
  at once too (the dataset is broken or is not the modality configured), whatever the fraction.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter
from typing import Any

import grain
import numpy as np

from vla_foundry_jax.data.shards import BadSampleError, DataError

logger = logging.getLogger(__name__)

BAD_SAMPLES_KEY = "__bad_samples__"  # per element: bad samples skipped to fill it (popped by the iterators)
BAD_SAMPLE_NOTE_KEY = "__bad_sample__"  # per element: "" or the first skipped sample (shard file, key, why)
MAX_CONSECUTIVE_BAD = 16


class BadSampleLog:
    """Thread-safe record of the bad samples met by the reader threads: one warning per shard, counts per shard.

    Counts here include samples read ahead (prefetch); the exact per-batch count travels with the batches.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.per_shard: Counter[str] = Counter()
        self.keys: set[str] = set()  # distinct "shard/key" met
        self.first_reason: str | None = None

    @property
    def count(self) -> int:
        return sum(self.per_shard.values())

    def record(self, shard_path: str, shard: str | None, key: str | None, reason: str) -> None:
        with self._lock:
            first_in_shard = shard_path not in self.per_shard
            self.per_shard[shard_path] += 1
            self.keys.add(f"{shard}/{key}")
            if self.first_reason is None:
                self.first_reason = reason
        if first_in_shard:
            logger.warning(
                "Skipping bad sample %r of shard %s (replaced by the next sample; further bad samples of this shard "
                "are counted, not logged): %s",
                key,
                shard_path,
                reason,
            )

    def record_shard(self, shard_path: str, samples: int, reason: str) -> None:
        """A whole shard skipped (unreadable), counted as its ``samples``; the caller warns."""
        with self._lock:
            self.per_shard[shard_path] += samples
            if self.first_reason is None:
                self.first_reason = reason

    def shards_summary(self, limit: int = 5) -> str:
        with self._lock:
            items = self.per_shard.most_common()
        text = ", ".join(f"{path} ({n})" for path, n in items[:limit])
        return text + (f" and {len(items) - limit} more shard(s)" if len(items) > limit else "")


class SkipBadSamples(grain.MapDataset):
    """``parent[i]``, or when that sample is bad (``BadSampleError``) ``parent[i + k]`` for the smallest k that is
    good, with ``BAD_SAMPLES_KEY: k`` added to the element (``count_key=None``: not added).

    ``sources``: the ``ShardDataSource``(s) the parent reads, to name shard files in warnings; several sources
    are read as the unshuffled concatenation of the parent (evaluation). More than ``max_consecutive`` bad
    samples in a row (or the whole dataset) raise ``DataError``.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        log: BadSampleLog,
        sources: list[Any],
        *,
        max_consecutive: int = MAX_CONSECUTIVE_BAD,
        count_key: str | None = BAD_SAMPLES_KEY,
        what: str = "dataset",
    ) -> None:
        super().__init__(parent)
        self._log = log
        self._sources = list(sources)
        self._cum = np.cumsum([0, *(len(s) for s in self._sources)]).tolist()
        self._max_consecutive = max_consecutive
        self._count_key = count_key
        self._what = what

    def __len__(self) -> int:
        return len(self._parent)

    def _shard_path(self, index: int, shard: str | None) -> str:
        if shard is None:
            return "<unknown shard>"
        if len(self._sources) == 1:
            source = self._sources[0]
        else:
            source = self._sources[min(bisect.bisect_right(self._cum, index) - 1, len(self._sources) - 1)]
        return source.shard_path(shard) if hasattr(source, "shard_path") else shard

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        index = int(index) % n
        reasons: list[str] = []
        note = ""
        for k in range(min(self._max_consecutive + 1, n)):
            j = (index + k) % n
            try:
                element = self._parent[j]
            except BadSampleError as e:
                path = self._shard_path(j, e.shard)
                self._log.record(path, e.shard, e.key, str(e))
                reasons.append(str(e))
                note = note or f"sample {e.key!r} of shard {path}: {e}"
                continue
            if self._count_key is not None:
                element = {**element, self._count_key: np.int32(k), BAD_SAMPLE_NOTE_KEY: np.str_(note)}
            return element
        raise DataError(
            f"{self._what}: {len(reasons)} consecutive samples from element {index} are bad (undecodable or "
            f"incomplete), so the data looks broken or is not the modality configured (data.dataset_modality); "
            f"first: {reasons[0]}"
        )

    def __str__(self) -> str:
        return f"SkipBadSamples(max_consecutive={self._max_consecutive})"


class BadSampleBudget:
    """What an iterator counts: bad samples popped from its batches, checked against the allowed fraction.

    ``planned``: the samples (rows) this iterator yields in all; ``fraction``: ``data.max_bad_sample_fraction``;
    ``field``: how the field is bound in gin (``text.max_bad_sample_fraction``), for the message.
    """

    def __init__(self, log: BadSampleLog, *, fraction: float, planned: int, field: str) -> None:
        self.log = log
        self.fraction = fraction
        self.planned = planned
        self.field = field
        self.allowed = int(np.floor(fraction * planned + 1e-9))
        self.count = 0
        self.first: str | None = None  # the first bad sample counted (in batch order), when known

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Pop the per-row counts from ``batch``, add them up, raise past the budget; the batch without them."""
        counts = batch.pop(BAD_SAMPLES_KEY, None)
        notes = batch.pop(BAD_SAMPLE_NOTE_KEY, None)
        if counts is not None:
            self.count += int(np.sum(counts))
            if self.first is None and notes is not None:
                self.first = next((str(x) for x in np.ravel(notes) if x), None)
            if self.count > self.allowed:
                first = (self.first or self.log.first_reason or "").rstrip(".")
                raise DataError(
                    f"{self.count} bad samples were skipped, more than data.max_bad_sample_fraction = {self.fraction} "
                    f"of the {self.planned} samples this run reads on this host (at most {self.allowed}). First: "
                    f"{first}. Bad samples met so far in {self.log.shards_summary()}. Fix or remove those shards, "
                    f"or raise {self.field} to accept more skipped samples."
                )
        return batch

    def summary(self) -> str | None:
        if not self.count:
            return None
        return (
            f"{self.count} bad sample(s) skipped and replaced ({self.count / max(self.planned, 1):.3%} of "
            f"{self.planned}; data.max_bad_sample_fraction = {self.fraction}) in {self.log.shards_summary()}."
        )

    def stats(self) -> dict[str, Any]:
        """For metrics: ``bad_samples`` (exact count so far), ``bad_sample_fraction`` (of the planned samples) and
        ``bad_samples_by_shard`` (shard file -> bad samples met by the readers, including read-ahead)."""
        return {
            "bad_samples": self.count,
            "bad_sample_fraction": self.count / max(self.planned, 1),
            "bad_samples_by_shard": dict(self.log.per_shard),
        }


class BadSampleCounters:
    """The bad-sample counters every training iterator exposes, read off its ``_budget`` (a BadSampleBudget)."""

    _budget: BadSampleBudget

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped (replaced by the next good one) to fill this host's batches returned so far."""
        return self._budget.count

    @property
    def bad_sample_stats(self) -> dict[str, Any]:
        """``{"bad_samples", "bad_sample_fraction", "bad_samples_by_shard"}`` (see ``BadSampleBudget.stats``)."""
        return self._budget.stats()

    @property
    def corrupt_images_skipped(self) -> int:
        """Bad samples skipped so far (the former image-only counter; every modality counts now)."""
        return self.bad_samples
