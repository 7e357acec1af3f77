"""Streaming training data: whole shards read in sequence, shuffled through a sample buffer, split between hosts.

The manifest is the index: start-up reads the manifests only (``num_sequences`` plans the run and is checked
when a shard is read; a shard holding a different count is named in one warning). Per manifest ``i`` and host
``p`` of ``P``:

* **shard order**: epoch ``e`` reads the manifest's shards in a permutation drawn from ``(seed, i, e)``
  (``data.shuffle``; manifest order otherwise); host ``p`` takes every ``P``-th shard of it, from the ``p``-th;
* **reading**: each shard is one whole-object read (``paths.read_bytes``: one GET on object storage, retried on
  transient failures), fetched ``READ_AHEAD`` shards ahead on background threads, and parsed in memory;
* **shuffle buffer** (``data.shuffle_buffer_size`` / ``data.shuffle_initial``, the original's webdataset
  fields): nothing comes out until ``shuffle_initial`` samples are buffered; then each sample out lets two in
  until the buffer holds ``shuffle_buffer_size``; the sample out is a uniform pick (``(seed, i, p)`` generator);
* **decoding**: the modality transform runs on ``data.num_workers`` threads, a window of samples ahead; each
  sample's random stream is drawn from ``(seed, i, epoch, shard, offset)``, so worker count and timing never
  change a batch.

Mixing: one modality -> each row picks its dataset from the weights (a ``(seed, p)`` generator; a dataset that
runs out leaves the draw); modalities differ -> each global batch comes from one dataset
(``pipeline.batch_choices``, as the random-access reader). So the batches are fixed by the seed and the number
of hosts (not independent of it, as with random access).

State (``get_state``, saved with every checkpoint): for each dataset the cursor of the next raw sample
(epoch, shard position, offset), the *positions* of the samples in the shuffle buffer (not their bytes: on
restore their shards are read again and the samples picked out), the buffer generator's state and the
skip count; plus the mixing generator, the batch count and the bad-sample count. A restored iterator continues
with exactly the batches the uninterrupted one would have produced. Several hosts save one state each
(gathered to process 0, which writes the checkpoint's data state).

Bad input: a sample that cannot be decoded is skipped and counted (``data.bad_samples`` policy); a shard that
cannot be read (deleted mid-run, empty, not a tar) is retried (``MISSING_SHARD_ATTEMPTS`` reads with backoff,
on top of ``paths.retry``), then skipped with one warning and counted as ``num_sequences`` bad samples, so the
run stops past ``data.max_bad_sample_fraction`` instead of silently training on a short epoch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.data.bad_samples import (
    BAD_SAMPLE_NOTE_KEY,
    BAD_SAMPLES_KEY,
    MAX_CONSECUTIVE_BAD,
    BadSampleBudget,
    BadSampleLog,
)
from vla_foundry_jax.data.shards import BadSampleError, DataError, ManifestEntry, parse_shard, read_manifest

logger = logging.getLogger(__name__)

STATE_VERSION = 1
READ_AHEAD = 2  # shards fetched ahead of the one being read, per dataset
MISSING_SHARD_ATTEMPTS = 3  # reads of a shard that fails (not transiently) before it is skipped
_MISSING_BACKOFF_S = 0.5


def _seed(*parts: int) -> list[int]:
    return [int(p) % 2**63 for p in parts]


@dataclasses.dataclass
class _Unreadable:
    """A shard that could not be read after the retries: skipped, and counted as its ``num_sequences`` samples."""

    reason: str
    samples: int


class ShardStream:
    """The raw samples of one manifest on one host, shard after shard, through the sample shuffle buffer.

    ``pull()`` returns ``(position, sample)`` or None at the end (no ``repeat``); ``snapshot()`` / ``restore()``
    save and reload the position exactly (see the module docstring).
    """

    def __init__(
        self,
        entries: list[ManifestEntry],
        *,
        seed: int,
        index: int,
        process_index: int,
        process_count: int,
        shuffle: bool,
        buffer_size: int,
        initial: int,
        repeat: bool,
        log: BadSampleLog,
        io_pool: concurrent.futures.Executor,
    ) -> None:
        if len(entries) < process_count:
            raise DataError(
                f"Dataset {paths.dirname(entries[0].path)!r} has {len(entries)} shard(s) for {process_count} hosts: "
                "streaming gives each host whole shards. Write it in at least as many shards as hosts, or set "
                "data.streaming = False."
            )
        self.entries = entries
        self.seed, self.index = seed, index
        self.process_index, self.process_count = process_index, process_count
        self.shuffle, self.repeat = shuffle, repeat
        self.buffer_size = buffer_size if shuffle else 1
        self.initial = min(initial, self.buffer_size) if shuffle else 1
        self._log = log
        self._pool = io_pool
        self._orders: dict[int, list[int]] = {}
        self._fetches: dict[tuple[int, int], concurrent.futures.Future] = {}
        self._warned: set[int] = set()
        self._reset()

    def _reset(self) -> None:
        self.epoch, self.shard, self.offset = 0, 0, 0
        self._samples: list[dict] | None = None
        self._buffer: list[dict] = []
        self._positions: list[tuple[int, int, int]] = []
        self._target = self.initial
        self._rng = np.random.default_rng(_seed(self.seed, self.index, self.process_index, 7))
        self.skipped = 0
        self._empty_epoch = True

    # ------------------------------------------------------------ shard order and reading

    def host_shards(self, epoch: int) -> list[int]:
        """Manifest indices of the shards this host reads in ``epoch``, in order."""
        if epoch not in self._orders:
            n = len(self.entries)
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng(_seed(self.seed, self.index, epoch, 3)).permutation(n)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order[self.process_index :: self.process_count].tolist()
        return self._orders[epoch]

    @property
    def planned_samples(self) -> int:
        """Samples of one epoch on this host, by the manifest's num_sequences."""
        return sum(self.entries[s].num_sequences or 0 for s in self.host_shards(0))

    def _read(self, shard: int) -> list[dict] | _Unreadable:
        entry = self.entries[shard]
        reason = ""
        for attempt in range(MISSING_SHARD_ATTEMPTS):
            try:
                samples, truncated = parse_shard(paths.read_bytes(entry.path), entry.path)
            except (paths.PathError, DataError, OSError) as e:
                reason = str(e)
                if attempt + 1 < MISSING_SHARD_ATTEMPTS:
                    delay = _MISSING_BACKOFF_S * 2**attempt
                    logger.warning(
                        "Cannot read shard %s (%s); attempt %d, retrying in %.1fs.", entry.path, e, attempt + 1, delay
                    )
                    time.sleep(delay)
                continue
            if not samples and (entry.num_sequences or 0) > 0:
                reason = f"shard {entry.path!r} holds no samples (an empty or interrupted copy?)"
                break
            if shard not in self._warned:
                if truncated:
                    logger.warning(
                        "Shard %s is cut short (%s): using its first %d sample(s).", entry.path, truncated, len(samples)
                    )
                if entry.num_sequences is not None and entry.num_sequences != len(samples):
                    logger.warning(
                        "Shard %s holds %d samples but its manifest line says num_sequences = %d; using the samples "
                        "found.",
                        entry.path,
                        len(samples),
                        entry.num_sequences,
                    )
                self._warned.add(shard)
            return samples
        return _Unreadable(reason, max(1, entry.num_sequences or 0))

    def _next_positions(self, epoch: int, shard: int, count: int) -> Iterator[tuple[int, int]]:
        for _ in range(count):
            shard += 1
            if shard >= len(self.host_shards(epoch)):
                if not self.repeat:
                    return
                epoch, shard = epoch + 1, 0
            yield epoch, shard

    def _fetch(self, epoch: int, shard: int) -> list[dict] | _Unreadable:
        """The samples of the ``shard``-th shard of ``epoch`` on this host; schedules the next ones."""
        for pos in [(epoch, shard), *self._next_positions(epoch, shard, READ_AHEAD)]:
            if pos not in self._fetches:
                self._fetches[pos] = self._pool.submit(self._read, self.host_shards(pos[0])[pos[1]])
        result = self._fetches.pop((epoch, shard)).result()
        return result

    def _next_raw(self) -> tuple[tuple[int, int, int], dict] | None:
        while True:
            if self.shard >= len(self.host_shards(self.epoch)):
                if not self.repeat:
                    return None
                if self._empty_epoch:
                    raise DataError(
                        f"Dataset {paths.dirname(self.entries[0].path)!r}: no shard of this host could be read in "
                        f"epoch {self.epoch}; check the dataset."
                    )
                self.epoch, self.shard, self.offset, self._empty_epoch = self.epoch + 1, 0, 0, True
            if self._samples is None:
                got = self._fetch(self.epoch, self.shard)
                if isinstance(got, _Unreadable):
                    entry = self.entries[self.host_shards(self.epoch)[self.shard]]
                    self.skipped += got.samples
                    self._log.record_shard(entry.path, got.samples, f"shard {entry.path} unreadable: {got.reason}")
                    logger.warning(
                        "Skipping shard %s after %d attempts (counted as %d bad samples): %s",
                        entry.path,
                        MISSING_SHARD_ATTEMPTS,
                        got.samples,
                        got.reason,
                    )
                    self.shard, self.offset = self.shard + 1, 0
                    continue
                self._samples = got
            if self.offset < len(self._samples):
                position = (self.epoch, self.shard, self.offset)
                sample = self._samples[self.offset]
                self.offset += 1
                self._empty_epoch = False
                return position, sample
            self._samples, self.shard, self.offset = None, self.shard + 1, 0

    # ------------------------------------------------------------ shuffle buffer

    def pull(self) -> tuple[tuple[int, int, int], dict] | None:
        """The next sample out of the shuffle buffer, with its position; None when the data ends."""
        while len(self._buffer) < self._target:
            raw = self._next_raw()
            if raw is None:
                break
            self._positions.append(raw[0])
            self._buffer.append(raw[1])
        if not self._buffer:
            return None
        self._target = min(self.buffer_size, self._target + 1)
        k = int(self._rng.integers(len(self._buffer))) if len(self._buffer) > 1 else 0
        for items in (self._buffer, self._positions):
            items[k], items[-1] = items[-1], items[k]
        return self._positions.pop(), self._buffer.pop()

    def shard_id(self, position: tuple[int, int, int]) -> int:
        return self.host_shards(position[0])[position[1]]

    def snapshot(self) -> dict[str, Any]:
        """The stream's position (JSON-serialisable; the buffer by sample positions)."""
        return {
            "cursor": [self.epoch, self.shard, self.offset],
            "buffer": list(self._positions),
            "target": self._target,
            "rng": self._rng.bit_generator.state,
            "skipped": self.skipped,
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Continue exactly from ``snap``: the buffered samples' shards are read again and the samples picked."""
        self._reset()
        self._fetches.clear()
        self.epoch, self.shard, self.offset = (int(x) for x in snap["cursor"])
        self._target = int(snap["target"])
        self._rng.bit_generator.state = snap["rng"]
        self.skipped = int(snap["skipped"])
        self._empty_epoch = False
        positions = [tuple(int(x) for x in p) for p in snap["buffer"]]
        shards = sorted({(e, s) for e, s, _ in positions})
        ids = [self.host_shards(e)[s] for e, s in shards]
        reads = dict(zip(shards, self._pool.map(self._read, ids), strict=True))
        for pos in positions:
            got = reads[pos[:2]]
            if isinstance(got, _Unreadable) or pos[2] >= len(got):
                self.skipped += 1  # its shard went away since the checkpoint: a bad sample
                continue
            self._positions.append(pos)
            self._buffer.append(got[pos[2]])
        current = reads.get((self.epoch, self.shard))
        if self.offset and current is not None and not isinstance(current, _Unreadable):
            self._samples = current  # else read again by the next pull, from the same offset


class _DecodedStream:
    """One dataset's decoded samples in stream order: the transform runs ``window`` samples ahead on ``pool``."""

    def __init__(
        self,
        stream: ShardStream,
        transform: Callable[[dict, np.random.Generator], dict],
        pool: concurrent.futures.Executor | None,
        window: int,
    ) -> None:
        self.stream = stream
        self.transform = transform
        self._pool = pool
        self._window = max(1, window)
        self._queue: collections.deque = collections.deque()
        self.exhausted = False

    def _apply(self, sample: dict, key: tuple[int, int, int]) -> dict | BadSampleError:
        """The transformed sample; ``key`` = (epoch, manifest shard index, offset) seeds its random stream."""
        if "__error__" in sample:
            return BadSampleError.of(sample, str(sample["__error__"]))
        rng = np.random.default_rng(_seed(self.stream.seed, self.stream.index, *key))
        try:
            return self.transform(sample, rng)
        except BadSampleError as e:
            return e

    def _fill(self) -> None:
        while not self.exhausted and len(self._queue) < self._window:
            got = self.stream.pull()
            if got is None:
                self.exhausted = True
                break
            (epoch, shard, offset), sample = got
            key = (epoch, self.stream.shard_id((epoch, shard, offset)), offset)
            snap = self.stream.snapshot()
            if self._pool is None:
                self._queue.append((None, (sample, key), snap))
            else:
                self._queue.append((self._pool.submit(self._apply, sample, key), None, snap))

    def next(self) -> tuple[dict | BadSampleError, dict] | None:
        """The next decoded element (or the BadSampleError of a bad one) and the stream snapshot after it."""
        self._fill()
        if not self._queue:
            return None
        future, raw, snap = self._queue.popleft()
        element = self._apply(*raw) if future is None else future.result()
        return element, snap

    def restore(self, snap: dict[str, Any]) -> None:
        for future, _, _ in self._queue:
            if future is not None:
                future.cancel()
        self._queue.clear()
        self.exhausted = False
        self.stream.restore(snap)


@dataclasses.dataclass(frozen=True)
class StreamFingerprint:
    """What fixes this host's batch sequence; a saved state only fits an iterator with the same one."""

    manifests: list[str]
    weights: list[float]
    modalities: list[str]
    seq_len: int
    seed: int
    shuffle: bool
    global_batch_size: int
    process_count: int
    shuffle_buffer_size: int
    shuffle_initial: int


class StreamingTrainIterator(Iterator[dict[str, np.ndarray]]):
    """This host's batches, read by streaming (same batch layout, counters and state API as ``TrainIterator``)."""

    reader = "streaming"

    def __init__(
        self,
        streams: list[_DecodedStream],
        weights: list[float],
        *,
        manifests: list[str],
        choices: np.ndarray | None,
        batch_datasets: np.ndarray | None,
        num_batches: int,
        host_batch_size: int,
        fingerprint: StreamFingerprint,
        process_index: int,
        budget: BadSampleBudget,
        log: BadSampleLog,
        pools: list[concurrent.futures.Executor],
    ) -> None:
        self._streams = streams
        self._weights = np.asarray(weights, np.float64)
        self._manifests = manifests
        self._choices = choices  # per-batch dataset (position in streams), or None: mixed per sample
        self.batch_datasets = batch_datasets  # the same as manifest indices (as TrainIterator.batch_datasets)
        self.num_batches = num_batches
        self.host_batch_size = host_batch_size
        self.global_batch_size = fingerprint.global_batch_size
        self.seq_len = fingerprint.seq_len
        self.process_index = process_index
        self.process_count = fingerprint.process_count
        self.dataset_sizes = [s.stream.planned_samples for s in streams]  # this host's samples per epoch (manifest)
        self._fingerprint = fingerprint
        self._budget = budget
        self._log = log
        self._pools = pools
        self._mix_seed = _seed(fingerprint.seed, process_index, 11)
        self._reset()

    def _reset(self) -> None:
        self._next = 0
        self._mix = np.random.default_rng(self._mix_seed)
        self._snaps: list[dict | None] = [None] * len(self._streams)
        self._skipped = [0] * len(self._streams)
        self._out = [False] * len(self._streams)

    # ------------------------------------------------------------ counters (as TrainIterator)

    @property
    def bad_samples(self) -> int:
        return self._budget.count

    @property
    def bad_sample_stats(self) -> dict[str, Any]:
        return self._budget.stats()

    @property
    def corrupt_images_skipped(self) -> int:
        return self.bad_samples

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> StreamingTrainIterator:
        return self

    # ------------------------------------------------------------ batches

    def _take(self, d: int, counts: list[int], notes: list[str]) -> dict | None:
        """The next good element of dataset ``d`` (bad ones counted into ``counts`` / ``notes``); None at its end."""
        consecutive = 0
        while True:
            got = self._streams[d].next()
            if got is None:  # the end: count the shards skipped on the way there
                counts[0] += self._streams[d].stream.skipped - self._skipped[d]
                self._skipped[d] = self._streams[d].stream.skipped
                return None
            element, snap = got
            self._snaps[d] = snap
            if snap["skipped"] > self._skipped[d]:  # unreadable shards met on the way: counted as bad samples
                counts[0] += snap["skipped"] - self._skipped[d]
                notes.append(f"unreadable shard(s) of {self._manifests[d]!r} (see the warning)")
                self._skipped[d] = snap["skipped"]
            if not isinstance(element, BadSampleError):
                return element
            path = paths.join(paths.dirname(self._manifests[d]), f"{element.shard}.tar") if element.shard else "?"
            self._log.record(path, element.shard, element.key, str(element))
            counts[0] += 1
            notes.append(f"sample {element.key!r} of shard {path}: {element}")
            consecutive += 1
            if consecutive > MAX_CONSECUTIVE_BAD:
                raise DataError(
                    f"data {self._manifests[d]!r}: {consecutive} consecutive samples are bad (undecodable or "
                    f"incomplete), so the data looks broken or is not the modality configured "
                    f"(data.dataset_modality); first: {notes[-consecutive]}"
                )

    def _ran_out(self, d: int | None, counts: list[int]) -> DataError:
        which = f"dataset {self._manifests[d]!r}" if d is not None else "every dataset"
        bad = self._budget.count + counts[0]
        return DataError(
            f"Streaming data ran out at batch {self._next} of {self.num_batches}: {which} has no more samples on host "
            f"{self.process_index} ({bad} bad sample(s) skipped so far, unreadable shards included: "
            f"{self._log.shards_summary() or 'none'}; or shards hold fewer samples than their num_sequences say). "
            "Fix or remove those shards, set data.allow_multiple_epochs = True, or lower "
            "experiment.total_train_samples."
        )

    def _row(self, counts: list[int], notes: list[str]) -> dict:
        if self._choices is not None:
            d = int(self._choices[self._next])
            element = self._take(d, counts, notes)
            if element is None:
                raise self._ran_out(d, counts)
            return element
        while True:
            live = np.where(self._out, 0.0, self._weights)
            if live.sum() <= 0:
                raise self._ran_out(None, counts)
            d = int(np.searchsorted(np.cumsum(live / live.sum()), self._mix.random(), side="right"))
            d = min(d, len(live) - 1)
            element = self._take(d, counts, notes)
            if element is not None:
                return element
            self._out[d] = True

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= self.num_batches:
            raise StopIteration
        counts, notes = [0], []
        rows = [self._row(counts, notes) for _ in range(self.host_batch_size)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch[BAD_SAMPLES_KEY] = np.int32(counts[0])
        batch[BAD_SAMPLE_NOTE_KEY] = np.str_(notes[0] if notes else "")
        batch = self._budget.take(batch)
        self._next += 1
        if self._next == self.num_batches:
            self.close()
            if summary := self._budget.summary():
                logging.warning("Data iterator finished: %s", summary)
        return batch

    # ------------------------------------------------------------ state

    def host_state(self) -> dict[str, Any]:
        """This host's position (JSON-serialisable)."""
        return {
            "next_batch": self._next,
            "bad_samples": self._budget.count,
            "mix_rng": self._mix.bit_generator.state,
            "streams": self._snaps,
            "skipped": self._skipped,
            "exhausted": self._out,
        }

    def get_state(self) -> dict[str, Any]:
        """Every host's position (gathered across processes when there are several), keyed by process index."""
        mine = self.host_state()
        return {
            "version": STATE_VERSION,
            "reader": self.reader,
            "fingerprint": dataclasses.asdict(self._fingerprint),
            "next_batch": self._next,
            "hosts": gather_host_states(self.process_index, mine),
        }

    def set_state(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue exactly where ``state`` (from ``get_state``) stopped. A state of another reader, host count,
        data or seed raises (``strict``) or warns: its positions would mean other samples."""
        if state.get("reader") != self.reader or state.get("version") != STATE_VERSION:
            raise DataError(
                f"The saved data iterator state was written by the {state.get('reader', 'random-access')} reader "
                f"(version {state.get('version')}); this run streams (data.streaming = True). Resume with the same "
                "data.streaming setting as the saved run."
            )
        saved, mine = state.get("fingerprint", {}), dataclasses.asdict(self._fingerprint)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if json.dumps(saved.get(k)) != json.dumps(v)}
        if diff:
            msg = "Restored data iterator state comes from a different pipeline (saved, now): " + ", ".join(
                f"{k}={s!r} vs {n!r}" for k, (s, n) in diff.items()
            )
            if strict:
                raise DataError(msg + "; the saved position would not continue the same sample sequence.")
            logging.warning("%s; continuing anyway.", msg)
        host = state.get("hosts", {}).get(str(self.process_index))
        if host is None:
            raise DataError(
                f"The saved data iterator state has no position for host {self.process_index} (saved hosts: "
                f"{sorted(state.get('hosts', {}))}); resume on the same number of hosts."
            )
        self._reset()
        self._next = int(host["next_batch"])
        self._budget.count = int(host["bad_samples"])
        self._mix.bit_generator.state = host["mix_rng"]
        self._skipped = [int(x) for x in host["skipped"]]
        self._out = [bool(x) for x in host["exhausted"]]
        for d, snap in enumerate(host["streams"]):
            self._snaps[d] = snap
            if snap is not None:
                self._streams[d].restore(snap)

    def close(self, wait: bool = False) -> None:
        """Stop the reader threads (pending reads are cancelled; ``wait``: until the running ones end)."""
        for pool in self._pools:
            pool.shutdown(wait=wait, cancel_futures=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def gather_host_states(process_index: int, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{str(process): state}`` of every process (an all-gather across JAX processes when there are several)."""
    import jax

    if jax.process_count() == 1:
        return {str(process_index): state}
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    everyone = multihost_utils.process_allgather(padded)
    states = [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everyone, np.ravel(sizes), strict=True)]
    return {str(p): s for p, s in enumerate(states)}


def build_streaming_iterator(
    data: Any,
    transforms: list[Callable[[dict, np.random.Generator], dict]],
    *,
    used: list[int],
    batch_datasets: np.ndarray | None,
    global_batch_size: int,
    num_batches: int,
    process_index: int,
    process_count: int,
    budget: BadSampleBudget,
    log: BadSampleLog,
) -> StreamingTrainIterator:
    """This host's streaming iterator over the manifests ``used`` (indices into ``data.dataset_manifest``, with
    their ``transforms``); ``batch_datasets``: per-batch dataset choice (positions in ``used``) or None (mix per
    sample). Reads only the manifests."""
    manifests = [list(data.dataset_manifest)[i] for i in used]
    weights = [float(data.weights[i]) for i in used]
    b = global_batch_size // process_count
    threads = data.num_workers if data.num_workers is not None else min(16, data.prefetch_factor)
    decode_pool = concurrent.futures.ThreadPoolExecutor(threads, "decode") if threads and data.prefetch_factor else None
    io_pool = concurrent.futures.ThreadPoolExecutor(max(2, READ_AHEAD * len(used)), "shard-read")
    window = b * max(1, data.prefetch_factor) if decode_pool is not None else 1
    streams = []
    for i, manifest, transform in zip(used, manifests, transforms, strict=True):
        entries = read_manifest(manifest)
        unknown = [e.shard for e in entries if e.num_sequences is None]
        if unknown:
            raise DataError(
                f"Manifest {manifest!r}: {len(unknown)} line(s) have no num_sequences (first: shard {unknown[0]!r}); "
                "the streaming reader plans the run from them. Add them, or set data.streaming = False."
            )
        stream = ShardStream(
            entries,
            seed=data.seed,
            index=i,
            process_index=process_index,
            process_count=process_count,
            shuffle=data.shuffle,
            buffer_size=data.shuffle_buffer_size,
            initial=data.shuffle_initial,
            repeat=data.allow_multiple_epochs,
            log=log,
            io_pool=io_pool,
        )
        streams.append(_DecodedStream(stream, transform, decode_pool, window))
    if not data.allow_multiple_epochs:
        have = [s.stream.planned_samples for s in streams]
        advice = "Set data.allow_multiple_epochs = True to repeat it, or lower experiment.total_train_samples."
        if batch_datasets is None and sum(have) < num_batches * b:
            raise DataError(
                f"Not enough training data: {num_batches} batches x {b} samples per host need {num_batches * b} "
                f"samples on each host, host {process_index} of {process_count} streams {sum(have)} (by the "
                f"manifests' num_sequences: {dict(zip(manifests, have, strict=True))}). {advice}"
            )
        for d, n in enumerate(have):
            need = int((batch_datasets == d).sum()) * b if batch_datasets is not None else 0
            if need > n:
                raise DataError(
                    f"Not enough training data: dataset {manifests[d]!r} is picked for {need // b} batches and "
                    f"needs {need} samples on host {process_index}, its shards for this host hold {n}. {advice}"
                )
    fingerprint = StreamFingerprint(
        manifests=list(data.dataset_manifest),
        weights=[float(w) for w in data.weights],
        modalities=list(data.modalities),
        seq_len=data.seq_len,
        seed=data.seed,
        shuffle=data.shuffle,
        global_batch_size=global_batch_size,
        process_count=process_count,
        shuffle_buffer_size=data.shuffle_buffer_size,
        shuffle_initial=data.shuffle_initial,
    )
    return StreamingTrainIterator(
        streams,
        weights,
        manifests=manifests,
        choices=batch_datasets,
        batch_datasets=None if batch_datasets is None else np.asarray(used, np.int64)[batch_datasets],
        num_batches=num_batches,
        host_batch_size=b,
        fingerprint=fingerprint,
        process_index=process_index,
        budget=budget,
        log=log,
        pools=[p for p in (decode_pool, io_pool) if p is not None],
    )
