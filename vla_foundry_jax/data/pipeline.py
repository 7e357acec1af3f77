"""The training input pipeline: grain over VLA Foundry manifests, mixed by weight, batched, sharded by host.

Per manifest i (grain ``MapDataset`` chain)::

    source(ShardDataSource) -> shuffle(seed_i)          if data.shuffle     (global sample-level shuffle)
                            -> repeat()                 if data.allow_multiple_epochs (reshuffled each epoch)
                            -> random_map(modality transform, seed'_i)      (decode / window / tokenize)

then ``MapDataset.mix(datasets, dataset_weighting)`` (grain's deterministic interleave: every window of
sum(proportions) consecutive samples holds each dataset in proportion), truncated to
``num_batches * global_batch_size`` samples. Global batch t is mixed samples ``[t*G, (t+1)*G)``; host p of P
takes rows ``[p*b, (p+1)*b)`` of it (``b = G / P``), via ``batch(b)`` then ``slice(p::P)``. So the global
batch never depends on the number of processes, and concatenating the hosts' batches in process order gives
the single-process batch. Batches are computed ahead on grain's reader threads
(``ReadOptions``: ``data.num_workers`` threads, ``data.prefetch_factor`` batches ahead).

Where this differs from the original (webdataset): the original shuffles *shard order* per checkpoint
window, reads samples in tar order, splits shards between ranks/workers and picks one dataset per *batch*
(``RandomMix``), so its batches are homogeneous and rank-dependent. Here shuffling is per sample over the
whole dataset, mixing is per sample (each batch holds the datasets in proportion) and the sequence of global
batches is the same for any host count. Samples are seen at most once per epoch in both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from vla_foundry_jax.data.shards import DataError, ShardDataSource
from vla_foundry_jax.data.text import TextTransform, TextUntokenizedTransform, load_tokenizer, tokenizer_name

STATE_VERSION = 1
_SUPPORTED = ("text", "text_untokenized")


def _derive_seed(seed: int, *parts: int) -> int:
    """A 32-bit seed for one dataset / one transformation, derived from the data seed."""
    return int(np.random.SeedSequence([seed % 2**63, *parts]).generate_state(1)[0])


def _modality_transform(data: Any, modality: str, manifest: str) -> TextTransform | TextUntokenizedTransform:
    if modality == "text":
        return TextTransform(data.seq_len)
    if modality == "text_untokenized":
        name = tokenizer_name(data)
        if name is None:
            raise DataError(
                f"Manifest {manifest!r} is text_untokenized but data type {data.type!r} names no tokenizer; "
                "use the text_untokenized data type and set its `tokenizer`."
            )
        load_tokenizer(name)  # load (and fail) here, in the main thread, not in a reader thread
        return TextUntokenizedTransform(data.seq_len, name)
    raise NotImplementedError(
        f"Modality {modality!r} (manifest {manifest!r}) has no grain pipeline yet; supported: {list(_SUPPORTED)}."
    )


@dataclasses.dataclass(frozen=True)
class _Fingerprint:
    """What fixes the sequence of global batches; a saved state only fits a pipeline with the same one.

    (allow_multiple_epochs and num_batches are not part of it: the first epoch is the same either way.)
    """

    manifests: list[str]
    weights: list[float]
    modalities: list[str]
    seq_len: int
    seed: int
    shuffle: bool
    global_batch_size: int


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """This host's batches ``{"input_ids": int32 [b, seq_len+1], "loss_mask": bool [b, seq_len+1]}``.

    ``get_state()`` is JSON-serialisable: ``{"version": 1, "next_batch": k, "fingerprint": {...}}`` where k
    counts the batches already returned. It is a *global* position (global batch k), so it can be restored
    with any process count. ``set_state`` restarts the grain iterator at batch k, exactly where it stopped.
    """

    def __init__(
        self,
        host_batches: grain.MapDataset,
        *,
        fingerprint: _Fingerprint,
        read_options: grain.ReadOptions,
        host_batch_size: int,
        process_index: int,
        process_count: int,
        dataset_sizes: list[int],
    ) -> None:
        self._ds = host_batches
        self._fingerprint = fingerprint
        self._read_options = read_options
        self.num_batches = len(host_batches)
        self.host_batch_size = host_batch_size
        self.global_batch_size = fingerprint.global_batch_size
        self.seq_len = fingerprint.seq_len
        self.process_index = process_index
        self.process_count = process_count
        self.dataset_sizes = dataset_sizes  # samples found per manifest
        self._next = 0
        self._it: Any = None

    def _start(self) -> None:
        self.close()
        self._it = iter(self._ds[self._next :].to_iter_dataset(self._read_options))

    def __iter__(self) -> TrainIterator:
        return self

    def __len__(self) -> int:
        return self.num_batches

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= self.num_batches:
            raise StopIteration
        if self._it is None:
            self._start()
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "next_batch": self._next,
            "fingerprint": dataclasses.asdict(self._fingerprint),
        }

    def set_state(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue with global batch ``state["next_batch"]``. With ``strict`` a state saved by a pipeline with
        other data / seed / batch size raises (its position would mean different samples); otherwise it warns."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"Data iterator state version {state.get('version')!r} is not {STATE_VERSION}: {state}")
        saved = state.get("fingerprint", {})
        mine = dataclasses.asdict(self._fingerprint)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if _jsonish(saved.get(k)) != _jsonish(v)}
        if diff:
            msg = "Restored data iterator state comes from a different pipeline (saved, now): " + ", ".join(
                f"{k}={s!r} vs {n!r}" for k, (s, n) in diff.items()
            )
            if strict:
                raise DataError(msg + "; the saved position would not continue the same sample sequence.")
            logging.warning("%s; continuing from batch %s anyway.", msg, state["next_batch"])
        k = int(state["next_batch"])
        if not 0 <= k <= self.num_batches:
            raise DataError(f"Data iterator state next_batch={k} is outside [0, {self.num_batches}].")
        self._next = k
        if k < self.num_batches:
            self._start()
        else:
            self.close()

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _jsonish(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonish(v) for v in x]
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _read_options(num_workers: int | None, prefetch_factor: int) -> grain.ReadOptions:
    """Threads computing batches ahead: ``num_workers`` (default: ``prefetch_factor``, at most 16) threads and a
    buffer of ``max(prefetch_factor, threads)`` batches; 0 workers or a 0 prefetch factor read synchronously."""
    if not prefetch_factor or prefetch_factor <= 0 or num_workers == 0:
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    threads = num_workers if num_workers is not None else min(16, prefetch_factor)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch_factor, threads))


def build_train_iterator(
    data: Any,
    *,
    global_batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainIterator:
    """Build this host's iterator over ``num_batches`` global batches of ``global_batch_size`` samples.

    ``data`` is a ``DataParams`` (text or text_untokenized). Raises ``DataError`` when the manifests hold too
    few samples for ``num_batches`` without ``data.allow_multiple_epochs``.
    """
    if global_batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"global_batch_size ({global_batch_size}) and num_batches ({num_batches}) must be positive.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count}).")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {process_count} processes; "
            "each host must get the same number of rows."
        )
    if not data.dataset_manifest:
        raise DataError(f"{data.gin_name}.dataset_manifest is empty: give at least one manifest.jsonl path.")
    b = global_batch_size // process_count
    manifests = list(data.dataset_manifest)
    weights = [float(w) for w in data.weights]
    modalities = list(data.modalities)

    sizes: list[int] = []
    parts: list[grain.MapDataset] = []
    used_weights: list[float] = []
    for i, (manifest, weight, modality) in enumerate(zip(manifests, weights, modalities, strict=True)):
        transform = _modality_transform(data, modality, manifest)
        source = ShardDataSource(manifest)
        sizes.append(len(source))
        if weight <= 0:
            logging.info("Dataset %s has weight %s: not used.", manifest, weight)
            continue
        ds = grain.MapDataset.source(source)
        if data.shuffle:
            ds = ds.shuffle(seed=_derive_seed(data.seed, i, 0))
        if data.allow_multiple_epochs:
            ds = ds.repeat()  # each epoch reshuffled (grain folds the epoch into the shuffle seed)
        ds = ds.random_map(transform, seed=_derive_seed(data.seed, i, 1))
        parts.append(ds)
        used_weights.append(weight)

    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, used_weights)
    needed = num_batches * global_batch_size
    if len(mixed) < needed:
        detail = ", ".join(f"{m}: {n}" for m, n in zip(manifests, sizes, strict=True))
        mix_note = f" (with weights {weights} the mixture can use {len(mixed)} before one dataset runs out)"
        raise DataError(
            f"Not enough training data: {num_batches} batches x {global_batch_size} samples need {needed} samples, "
            f"the data holds {sum(sizes)} ({detail}){mix_note if len(parts) > 1 else ''}. "
            "Set data.allow_multiple_epochs = True to repeat it, or lower experiment.total_train_samples."
        )
    host = mixed[:needed].batch(b, drop_remainder=True)[process_index::process_count]
    assert len(host) == num_batches, (len(host), num_batches)

    read_options = _read_options(data.num_workers, data.prefetch_factor)
    fingerprint = _Fingerprint(
        manifests=manifests,
        weights=weights,
        modalities=modalities,
        seq_len=data.seq_len,
        seed=data.seed,
        shuffle=data.shuffle,
        global_batch_size=global_batch_size,
    )
    return TrainIterator(
        host,
        fingerprint=fingerprint,
        read_options=read_options,
        host_batch_size=b,
        process_index=process_index,
        process_count=process_count,
        dataset_sizes=sizes,
    )
