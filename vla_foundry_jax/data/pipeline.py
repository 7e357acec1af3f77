"""The input pipelines: grain over VLA Foundry manifests, mixed by weight, batched, sharded by host.

Per manifest i (grain ``MapDataset`` chain)::

    source -> shuffle(seed_i)          if data.shuffle     (global sample-level shuffle)
           -> repeat()                 if data.allow_multiple_epochs (reshuffled each epoch)
           -> random_map(modality transform, seed'_i)      (decode / window / tokenize / augment + process)

           -> SkipBadSamples                                (a bad sample -> the next good one, counted)

The source is a ``ShardDataSource`` (raw members); the transform decodes them (``data.text``,
``data.image_caption``; ``robotics`` samples, the original's robotics layout, are windowed, normalised and
processed by ``data.robotics.RoboticsTransform``). Bad samples follow one policy in every modality (see
``data.bad_samples``): skipped (replaced by the next element), warned once per shard, counted exactly per batch
(``TrainIterator.bad_samples`` / ``bad_sample_stats``), and the iterator stops with a ``DataError`` once they
pass ``data.max_bad_sample_fraction`` of the samples it yields.

Mixing. When every used manifest has the same modality, samples are mixed: ``MapDataset.mix(datasets,
dataset_weighting)`` (grain's deterministic interleave: every window of sum(proportions) consecutive samples
holds each dataset in proportion), truncated to ``num_batches * global_batch_size`` samples, and global batch t
is mixed samples ``[t*G, (t+1)*G)``. When the modalities differ (e.g. image_caption + text: their batches have
different keys), each *global batch* comes from ONE dataset, as the original's per-batch ``RandomMix``: dataset
``d_t`` of batch t is drawn from the weights (``u_t ~ U[0, 1)`` from a generator seeded by ``data.seed``,
``d_t = searchsorted(cumsum(w) / sum(w), u_t)``; a prefix does not depend on ``num_batches``) and batch t is
that dataset's next ``G`` samples. ``TrainIterator.batch_datasets`` lists ``d_t``.

Hosts: host p of P takes rows ``[p*b, (p+1)*b)`` of every global batch (``b = G / P``), via ``batch(b)`` then
``slice(p::P)``. So the global batch never depends on the number of processes, and concatenating the hosts'
batches in process order gives the single-process batch. Batches are computed ahead on grain's reader threads
(``ReadOptions``: ``data.num_workers`` threads, ``data.prefetch_factor`` batches ahead).

Where this differs from the original (webdataset): the original shuffles *shard order* per checkpoint
window, reads samples in tar order and splits shards between ranks/workers, so its batches are
rank-dependent; it also always mixes per batch. Here shuffling is per sample over the whole dataset, mixing
is per sample for one modality, and the sequence of global batches is the same for any host count. Samples
are seen at most once per epoch in both.

Evaluation: ``build_eval_iterator`` reads held-out manifests once, in order, unshuffled, without random
augmentation; the last batch is padded to full size (see there).

Two readers, one choice (``data.streaming``): the random-access reader above (default; every shard's tar headers
indexed at start-up, remote shards copied locally first; global batches independent of the host count) suits
local datasets of up to a few thousand shards and is the one evaluation always uses (held-out sets are small and
read in order); the streaming reader (``data.streaming = True``, ``data.streaming``: start-up reads the manifests
only, virtual streams read whole shards through shuffle buffers, the original's behaviour, and hosts read the
streams of their rows, so its batches too are independent of the host count) is for pod-scale training data, on
object storage or many shards. Both yield the same batch layout, count bad samples under the
same policy and save their state in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from vla_foundry_jax.data.bad_samples import BadSampleBudget, BadSampleCounters, BadSampleLog, SkipBadSamples
from vla_foundry_jax.data.image_caption import ImageCaptionTransform, ProcessorTextTransform
from vla_foundry_jax.data.shards import DataError, ShardDataSource
from vla_foundry_jax.data.streaming import StreamingTrainIterator, build_streaming_iterator
from vla_foundry_jax.data.text import TextTransform, TextUntokenizedTransform, load_tokenizer, tokenizer_name

STATE_VERSION = 1
_SUPPORTED = ("text", "text_untokenized", "image_caption", "robotics")


def _derive_seed(seed: int, *parts: int) -> int:
    """A 32-bit seed for one dataset / one transformation, derived from the data seed."""
    return int(np.random.SeedSequence([seed % 2**63, *parts]).generate_state(1)[0])


def _processor(data: Any, modality: str, manifest: str) -> Any:
    if getattr(data, "type", None) != "image_caption":
        raise DataError(
            f"Manifest {manifest!r} is {modality} data read through a VLM processor, but data type "
            f"{getattr(data, 'type', None)!r} has none; use the image_caption data type (image_caption.processor)."
        )
    from vla_foundry_jax.data.processor import processor_for_data

    return processor_for_data(data)  # load (and fail) here, in the main thread, not in a reader thread


def _transform(data: Any, modality: str, manifest: str, *, train: bool = True) -> Any:
    """The per-sample transform ``(raw sample, rng) -> arrays`` of one manifest (loaded, and failing, here)."""
    if modality not in _SUPPORTED:
        raise NotImplementedError(
            f"Modality {modality!r} (manifest {manifest!r}) has no grain pipeline yet; supported: {list(_SUPPORTED)}."
        )
    if modality == "text":
        return TextTransform(data.seq_len)
    if modality == "robotics":
        if getattr(data, "type", None) != "robotics":
            raise DataError(
                f"Manifest {manifest!r} is robotics data but data type {getattr(data, 'type', None)!r} cannot read it; "
                "use the robotics data type (experiment.data = @robotics())."
            )
        from vla_foundry_jax.data.robotics import robotics_transform

        return robotics_transform(data, train=train)
    if modality == "text_untokenized":
        if getattr(data, "type", None) == "image_caption":
            return ProcessorTextTransform(_processor(data, modality, manifest), data.seq_len)
        name = tokenizer_name(data)
        if name is None:
            raise DataError(
                f"Manifest {manifest!r} is text_untokenized but data type {data.type!r} names no tokenizer; "
                "use the text_untokenized data type and set its `tokenizer`."
            )
        load_tokenizer(name)  # load (and fail) here, in the main thread, not in a reader thread
        return TextUntokenizedTransform(data.seq_len, name)
    processor = _processor(data, modality, manifest)
    return ImageCaptionTransform(processor, data.seq_len, data.augmentation, train=train)  # decodes: bad -> skipped


def _source_and_transform(data: Any, modality: str, manifest: str, *, train: bool = True) -> tuple[Any, Any]:
    """The random-access source and the per-sample transform of one manifest."""
    transform = _transform(data, modality, manifest, train=train)
    return ShardDataSource(manifest), transform


class _BatchSelect(grain.MapDataset):
    """Global batch t = batch ``pos[t]`` of parent ``choices[t]`` (per-batch mixing of datasets)."""

    def __init__(self, parents: list[grain.MapDataset], choices: np.ndarray) -> None:
        super().__init__(parents)
        self._choices = choices
        self._pos = np.zeros(len(choices), np.int64)
        for d in range(len(parents)):
            idx = np.flatnonzero(choices == d)
            self._pos[idx] = np.arange(len(idx))

    def __len__(self) -> int:
        return len(self._choices)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        d = int(self._choices[index])
        return self.parents[d][int(self._pos[index])]

    def __str__(self) -> str:
        return f"_BatchSelect(datasets={len(self.parents)})"


def batch_choices(weights: list[float], num_batches: int, seed: int) -> np.ndarray:
    """Dataset of each global batch for per-batch mixing (int64 ``[num_batches]``); prefix-stable in num_batches."""
    w = np.asarray(weights, np.float64)
    cdf = np.cumsum(w / w.sum())
    u = np.random.default_rng(_derive_seed(seed, 2**20, 0)).random(num_batches)
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1).astype(np.int64)


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


class TrainIterator(BadSampleCounters, Iterator[dict[str, np.ndarray]]):
    """This host's batches ``{"input_ids": int32 [b, seq_len+1], "loss_mask": bool [b, seq_len+1]}``, plus
    ``"pixel_values": float32 [b, 1, H, W, 3]`` for image_caption batches; robotics batches hold the arrays of
    ``data.robotics`` (``input_ids``, ``attention_mask``, ``pixel_values [b, N, H, W, 3]``, ``actions``, masks, ...).

    ``get_state()`` is JSON-serialisable: ``{"version": 1, "next_batch": k, "fingerprint": {...},
    "bad_samples": n}`` where k counts the batches already returned. It is a *global* position (global batch k),
    so it can be restored with any process count. ``set_state`` restarts the grain iterator at batch k, exactly
    where it stopped (and restores this host's bad-sample count).

    ``bad_samples``: bad samples skipped (replaced) to fill the batches returned so far on this host; exact and
    deterministic. ``bad_sample_stats``: that count, its fraction of the planned samples and the per-shard counts,
    for metrics. Past ``data.max_bad_sample_fraction`` of the planned samples, ``next`` raises ``DataError``.
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
        sources: list[Any] = (),
        batch_datasets: np.ndarray | None = None,
        budget: BadSampleBudget | None = None,
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
        self.sources = list(sources)
        # per-batch mixing: index (into the manifests) of the dataset of each global batch; None when mixed per sample
        self.batch_datasets = batch_datasets
        self._next = 0
        self._it: Any = None
        planned = self.num_batches * host_batch_size
        self._budget = budget or BadSampleBudget(BadSampleLog(), fraction=1.0, planned=planned, field="data")

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
        try:
            batch = self._budget.take(next(self._it))
        except BaseException:  # over budget, a read error, Ctrl-C: stop the read-ahead threads now, not at GC
            self.close()
            raise
        self._next += 1
        if self._next == self.num_batches and (summary := self._budget.summary()):
            logging.warning("Data iterator finished: %s", summary)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "next_batch": self._next,
            "fingerprint": dataclasses.asdict(self._fingerprint),
            "bad_samples": self._budget.count,
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
        self._budget.count = int(state.get("bad_samples", 0))
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


def _check_hosts(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count}).")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {process_count} processes; "
            "each host must get the same number of rows."
        )
    return global_batch_size // process_count


def build_train_iterator(
    data: Any,
    *,
    global_batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainIterator | StreamingTrainIterator:
    """Build this host's iterator over ``num_batches`` global batches of ``global_batch_size`` samples.

    ``data`` is a ``DataParams`` (text, text_untokenized, image_caption or robotics). Raises ``DataError`` when the
    manifests hold too few samples for ``num_batches`` without ``data.allow_multiple_epochs``.
    """
    if global_batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"global_batch_size ({global_batch_size}) and num_batches ({num_batches}) must be positive.")
    b = _check_hosts(global_batch_size, process_index, process_count)
    if not data.dataset_manifest:
        raise DataError(f"{data.gin_name}.dataset_manifest is empty: give at least one manifest.jsonl path.")
    manifests = list(data.dataset_manifest)
    weights = [float(w) for w in data.weights]
    modalities = list(data.modalities)
    if getattr(data, "streaming", False):
        return _streaming_iterator(data, global_batch_size, num_batches, process_index, process_count)

    sizes: list[int] = []
    sources: list[Any] = []
    parts: list[grain.MapDataset] = []
    used: list[int] = []
    log = BadSampleLog()
    for i, (manifest, weight, modality) in enumerate(zip(manifests, weights, modalities, strict=True)):
        source, transform = _source_and_transform(data, modality, manifest)
        sizes.append(len(source))
        sources.append(source)
        if weight <= 0:
            logging.info("Dataset %s has weight %s: not used.", manifest, weight)
            continue
        ds = grain.MapDataset.source(source)
        if data.shuffle:
            ds = ds.shuffle(seed=_derive_seed(data.seed, i, 0))
        if data.allow_multiple_epochs:
            ds = ds.repeat()  # each epoch reshuffled (grain folds the epoch into the shuffle seed)
        ds = ds.random_map(transform, seed=_derive_seed(data.seed, i, 1))
        parts.append(SkipBadSamples(ds, log, [source], what=f"{modality} data {manifest!r}"))
        used.append(i)
    used_weights = [weights[i] for i in used]
    needed = num_batches * global_batch_size
    detail = ", ".join(f"{m}: {n}" for m, n in zip(manifests, sizes, strict=True))
    advice = "Set data.allow_multiple_epochs = True to repeat it, or lower experiment.total_train_samples."

    choices = None
    if len({modalities[i] for i in used}) <= 1:  # one modality: mix per sample
        mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, used_weights)
        if len(mixed) < needed:
            mix_note = f" (with weights {weights} the mixture can use {len(mixed)} before one dataset runs out)"
            raise DataError(
                f"Not enough training data: {num_batches} batches x {global_batch_size} samples need {needed} "
                f"samples, the data holds {sum(sizes)} ({detail}){mix_note if len(parts) > 1 else ''}. {advice}"
            )
        host = mixed[:needed].batch(b, drop_remainder=True)[process_index::process_count]
    else:  # modalities differ: one dataset per global batch
        local = batch_choices(used_weights, num_batches, data.seed)
        host_parts = []
        for d, ds in enumerate(parts):
            count = int((local == d).sum())
            if len(ds) < count * global_batch_size:
                raise DataError(
                    f"Not enough training data: dataset {manifests[used[d]]!r} (weight {used_weights[d]}) is picked "
                    f"for {count} of the {num_batches} global batches and needs {count * global_batch_size} samples, "
                    f"it holds {len(ds)} ({detail}). {advice}"
                )
            sel = ds[: count * global_batch_size].batch(b, drop_remainder=True)
            host_parts.append(sel[process_index::process_count])
        host = _BatchSelect(host_parts, local)
        choices = np.asarray(used, np.int64)[local]
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
        sources=sources,
        batch_datasets=choices,
        budget=_budget(data, log, num_batches * b),
    )


def _streaming_iterator(
    data: Any, global_batch_size: int, num_batches: int, process_index: int, process_count: int
) -> StreamingTrainIterator:
    """The streaming reader (``data.streaming``): the same mixing rules; start-up reads the manifests only."""
    manifests, weights, modalities = list(data.dataset_manifest), list(data.weights), list(data.modalities)
    used = [i for i, w in enumerate(weights) if w > 0]
    for i in set(range(len(manifests))) - set(used):
        logging.info("Dataset %s has weight %s: not used.", manifests[i], weights[i])
    transforms = [_transform(data, modalities[i], manifests[i]) for i in used]
    choices = None
    if len({modalities[i] for i in used}) > 1:  # modalities differ: one dataset per global batch
        choices = batch_choices([weights[i] for i in used], num_batches, data.seed)
    log = BadSampleLog()
    return build_streaming_iterator(
        data,
        transforms,
        used=used,
        batch_datasets=choices,
        global_batch_size=global_batch_size,
        num_batches=num_batches,
        process_index=process_index,
        process_count=process_count,
        budget=lambda planned: _budget(data, log, planned),
        log=log,
    )


def _budget(data: Any, log: BadSampleLog, planned: int) -> BadSampleBudget:
    fraction = float(getattr(data, "max_bad_sample_fraction", 0.0))
    return BadSampleBudget(log, fraction=fraction, planned=planned, field=f"{data.gin_name}.max_bad_sample_fraction")


# ---------------------------------------------------------------- evaluation


class _PadToLength(grain.MapDataset):
    """The parent's samples with ``"valid": True``, then padding samples (``valid`` False) up to ``length``."""

    def __init__(self, parent: grain.MapDataset, length: int, pad: dict[str, np.ndarray]) -> None:
        super().__init__(parent)
        self._length = length
        self._n = len(parent)
        self._pad = pad

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        if index < self._n:
            return {**self._parent[index], "valid": np.bool_(True)}
        return {k: v.copy() for k, v in self._pad.items()}

    def __str__(self) -> str:
        return f"_PadToLength({self._length})"


def _padding_sample(example: dict[str, np.ndarray], pad_token_id: int) -> dict[str, np.ndarray]:
    pad = {k: np.zeros_like(v) for k, v in example.items()}
    if "input_ids" in pad:
        pad["input_ids"][...] = pad_token_id
    pad["valid"] = np.bool_(False)
    return pad


class EvalIterator:
    """One pass over held-out data: this host's rows of ``num_batches`` global batches, in dataset order.

    Re-iterable: every ``iter()`` starts a fresh pass. ``num_samples`` real samples; the last global batch is
    padded to full size with padding rows: every batch has ``"valid": bool [b]`` (False on padding rows), and
    padding rows have ``loss_mask`` all False, ``input_ids`` = the pad id and zero ``pixel_values``, so a
    masked loss ignores them without looking at ``valid``.
    """

    def __init__(
        self,
        host_batches: grain.MapDataset,
        read_options: grain.ReadOptions,
        num_samples: int,
        budget: Callable[[], BadSampleBudget] | None = None,
    ) -> None:
        self._ds = host_batches
        self._read_options = read_options
        self.num_batches = len(host_batches)
        self.num_samples = num_samples
        self._new_budget = budget
        self.bad_samples = 0  # bad samples skipped (replaced) in the current / last pass on this host

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        budget = self._new_budget() if self._new_budget is not None else None
        self.bad_samples = 0
        batches = iter(self._ds.to_iter_dataset(self._read_options))
        try:
            for batch in batches:
                if budget is not None:
                    batch = budget.take(batch)
                    self.bad_samples = budget.count
                yield batch
        finally:  # a pass stopped early (over budget, a break) stops its read-ahead threads now, not at GC
            if hasattr(batches, "close"):
                batches.close()
        if budget is not None and (summary := budget.summary()):
            logging.warning("Evaluation pass finished: %s", summary)


def build_eval_iterator(
    data: Any,
    manifests: str | list[str] | tuple[str, ...] | None = None,
    *,
    global_batch_size: int,
    modality: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalIterator:
    """Iterate held-out ``manifests`` (default ``data.val_dataset_manifest``, concatenated in order) once.

    All manifests are read as ``modality`` (default: the data type's own). No shuffling; image crops are centred
    and colour jitter is off (``train=False``); ``text`` windows of long samples still use a fixed per-sample
    seed. Host slicing as in training: host p gets rows ``[p*b, (p+1)*b)`` of each global batch.
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    b = _check_hosts(global_batch_size, process_index, process_count)
    if manifests is None:
        manifests = list(data.val_dataset_manifest)
    elif isinstance(manifests, str):
        manifests = [manifests]
    if not manifests:
        raise DataError(f"No evaluation manifests: pass some or set {data.gin_name}.val_dataset_manifest.")
    modality = modality or data.type
    pairs = [_source_and_transform(data, modality, m, train=False) for m in manifests]
    parts = [grain.MapDataset.source(src) for src, _ in pairs]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    ds = ds.random_map(pairs[0][1], seed=_derive_seed(data.seed, 2**20, 1))
    log = BadSampleLog()
    ds = SkipBadSamples(ds, log, [src for src, _ in pairs], what=f"{modality} evaluation data {manifests!r}")
    n = len(ds)
    num_batches = -(-n // global_batch_size)
    example = ds[0]
    transform = pairs[0][1]
    pad_id = getattr(getattr(transform, "processor", None), "pad_token_id", None)
    if pad_id is None:
        pad_id = load_tokenizer(tokenizer_name(data)).pad_token_id if modality == "text_untokenized" else 0
    padded = _PadToLength(ds, num_batches * global_batch_size, _padding_sample(example, pad_id))
    host = padded.batch(b, drop_remainder=True)[process_index::process_count]
    planned = len(host) * b
    return EvalIterator(
        host, _read_options(data.num_workers, data.prefetch_factor), n, lambda: _budget(data, log, planned)
    )
