"""Streaming training data: whole shards read in sequence, shuffled through a sample buffer, in virtual streams.

The manifest is the index: start-up reads the manifests only (``num_sequences`` plans the run and is checked
when a shard is read; a shard holding a different count is named in one warning).

The global batch sequence does not depend on the host count. It is built from ``S`` *virtual streams*
(``data.num_streams``; default: the largest divisor of the global batch that is at most ``MAX_DEFAULT_STREAMS``
and at most the shard count of the smallest dataset). Stream ``s`` fills rows ``[s * r, (s + 1) * r)`` of every
global batch (``r = global_batch / S``) and, per manifest ``i``, has its own

* **shard order**: epoch ``e`` reads the manifest's shards in a permutation drawn from ``(seed, i, e)``
  (``data.shuffle``; manifest order otherwise); stream ``s`` takes every ``S``-th shard of it, from the ``s``-th;
* **reading**: each shard is one whole-object read (``paths.read_bytes``: one GET on object storage, retried on
  transient failures), fetched ahead on background threads, and parsed in memory;
* **shuffle buffer** (``data.shuffle_buffer_size`` / ``data.shuffle_initial``, the original's webdataset
  fields, per stream as the original's are per loader worker): nothing comes out until ``shuffle_initial``
  samples are buffered; then each sample out lets two in until the buffer holds ``shuffle_buffer_size``; the
  sample out is a uniform pick (``(seed, i, s)`` generator);
* **decoding**: the modality transform runs on ``data.num_workers`` threads, a window of samples ahead; each
  sample's random stream is drawn from ``(seed, i, epoch, shard, offset)``, so worker count and timing never
  change a batch.

Mixing: one modality -> each row of stream ``s`` picks its dataset from the weights (a ``(seed, s)`` generator;
a dataset that runs out leaves that stream's draw); modalities differ -> each global batch comes from one
dataset (``pipeline.batch_choices``, as the random-access reader).

Hosts: host ``p`` of ``P`` yields rows ``[p * B / P, (p + 1) * B / P)`` of the global batch ``B``, so it reads
the streams those rows come from. With ``S`` a multiple of ``P`` each host reads ``S / P`` whole streams and
no two hosts read the same shard; otherwise a stream whose rows are split between hosts is read and decoded by
each of them (the work is repeated, the batches are the same). Bad samples of a stream are counted by the host
that holds the stream's first row, so the hosts' counts add up to the same total for any host count.

State (``get_state``, saved with every checkpoint): per stream, for each dataset the cursor of the next raw
sample (epoch, shard position, offset), the *positions* of the samples in the shuffle buffer (not their bytes:
on restore their shards are read again and the samples picked out), the buffer generator's state and the skip
count; the stream's mixing generator and bad-sample count; plus the batch count. Each stream's state is written
by the host holding its first row (gathered to process 0, which writes the checkpoint's data state); a host
restores the streams it reads, so a run saved on ``P`` hosts continues on ``Q`` with exactly the batches of the
uninterrupted one.

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
    BadSampleCounters,
    BadSampleLog,
)
from vla_foundry_jax.data.shards import BadSampleError, DataError, ManifestEntry, parse_shard, read_manifest

logger = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: per-host states of the reader whose batches depended on the host count
MAX_DEFAULT_STREAMS = 64  # the default data.num_streams is at most this
READ_AHEAD = 2  # shards fetched ahead of the one being read, per dataset, on a host reading one stream (else 1)
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
    """The raw samples of one manifest in one virtual stream, shard after shard, through the sample shuffle buffer.

    ``pull()`` returns ``(position, sample)`` or None at the end (no ``repeat``); ``snapshot()`` / ``restore()``
    save and reload the position exactly (see the module docstring).
    """

    def __init__(
        self,
        entries: list[ManifestEntry],
        *,
        seed: int,
        index: int,
        stream: int,
        num_streams: int,
        shuffle: bool,
        buffer_size: int,
        initial: int,
        repeat: bool,
        log: BadSampleLog,
        io_pool: concurrent.futures.Executor,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        self.entries = entries
        self.seed, self.index = seed, index
        self.stream, self.num_streams = stream, num_streams
        self.shuffle, self.repeat = shuffle, repeat
        self.buffer_size = buffer_size if shuffle else 1
        self.initial = min(initial, self.buffer_size) if shuffle else 1
        self.read_ahead = read_ahead
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
        self._rng = np.random.default_rng(_seed(self.seed, self.index, self.stream, 7))
        self.skipped = 0
        self._empty_epoch = True

    # ------------------------------------------------------------ shard order and reading

    def stream_shards(self, epoch: int) -> list[int]:
        """Manifest indices of the shards this stream reads in ``epoch``, in order."""
        if epoch not in self._orders:
            n = len(self.entries)
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng(_seed(self.seed, self.index, epoch, 3)).permutation(n)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order[self.stream :: self.num_streams].tolist()
        return self._orders[epoch]

    @property
    def planned_samples(self) -> int:
        """Samples of one epoch of this stream, by the manifest's num_sequences."""
        return sum(self.entries[s].num_sequences or 0 for s in self.stream_shards(0))

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
            if shard >= len(self.stream_shards(epoch)):
                if not self.repeat:
                    return
                epoch, shard = epoch + 1, 0
            yield epoch, shard

    def _schedule(self, epoch: int, shard: int) -> None:
        for pos in [(epoch, shard), *self._next_positions(epoch, shard, self.read_ahead)]:
            if pos not in self._fetches:
                self._fetches[pos] = self._pool.submit(self._read, self.stream_shards(pos[0])[pos[1]])

    def _fetch(self, epoch: int, shard: int) -> list[dict] | _Unreadable:
        """The samples of the ``shard``-th shard of ``epoch`` in this stream; schedules the next ones."""
        self._schedule(epoch, shard)
        return self._fetches.pop((epoch, shard)).result()

    def prefetch(self) -> None:
        """Start reading the shard the next raw sample comes from (and the ones after it) without waiting."""
        if self._samples is None and self.shard < len(self.stream_shards(self.epoch)):
            self._schedule(self.epoch, self.shard)

    def _next_raw(self) -> tuple[tuple[int, int, int], dict] | None:
        while True:
            if self.shard >= len(self.stream_shards(self.epoch)):
                if not self.repeat:
                    return None
                if self._empty_epoch:
                    raise DataError(
                        f"Dataset {paths.dirname(self.entries[0].path)!r}: no shard of stream {self.stream} (of "
                        f"{self.num_streams}, data.num_streams) could be read in epoch {self.epoch}; check the "
                        "dataset."
                    )
                self.epoch, self.shard, self.offset, self._empty_epoch = self.epoch + 1, 0, 0, True
            if self._samples is None:
                got = self._fetch(self.epoch, self.shard)
                if isinstance(got, _Unreadable):
                    entry = self.entries[self.stream_shards(self.epoch)[self.shard]]
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
        return self.stream_shards(position[0])[position[1]]

    def snapshot(self) -> dict[str, Any]:
        """The stream's position (JSON-serialisable; the buffer by sample positions)."""
        return {
            "cursor": [self.epoch, self.shard, self.offset],
            "buffer": list(self._positions),
            "target": self._target,
            "rng": self._rng.bit_generator.state,
            "skipped": self.skipped,
        }

    def restore(self, snap: dict[str, Any] | None) -> None:
        """Continue exactly from ``snap`` (None: the start): the buffered samples' shards are read again and the
        samples picked."""
        self._reset()
        self._fetches.clear()
        if snap is None:
            return
        self.epoch, self.shard, self.offset = (int(x) for x in snap["cursor"])
        self._target = int(snap["target"])
        self._rng.bit_generator.state = snap["rng"]
        self.skipped = int(snap["skipped"])
        self._empty_epoch = False
        positions = [tuple(int(x) for x in p) for p in snap["buffer"]]
        shards = sorted({(e, s) for e, s, _ in positions})
        ids = [self.stream_shards(e)[s] for e, s in shards]
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

    def restore(self, snap: dict[str, Any] | None) -> None:
        for future, _, _ in self._queue:
            if future is not None:
                future.cancel()
        self._queue.clear()
        self.exhausted = False
        self.stream.restore(snap)


@dataclasses.dataclass(frozen=True)
class StreamFingerprint:
    """What fixes the global batch sequence; a saved state only fits an iterator with the same one (the host
    count is not part of it)."""

    manifests: list[str]
    weights: list[float]
    modalities: list[str]
    seq_len: int
    seed: int
    shuffle: bool
    global_batch_size: int
    num_streams: int
    shuffle_buffer_size: int
    shuffle_initial: int


def default_num_streams(global_batch_size: int, fewest_shards: int) -> int:
    """The largest divisor of the global batch that is at most ``MAX_DEFAULT_STREAMS`` and ``fewest_shards``."""
    limit = max(1, min(MAX_DEFAULT_STREAMS, fewest_shards))
    return max(k for k in range(1, limit + 1) if global_batch_size % k == 0)


@dataclasses.dataclass(frozen=True)
class HostLayout:
    """Which rows of the global batch a host yields and which streams it reads for them."""

    rows_per_stream: int
    lo: int  # this host's rows of the global batch: [lo, hi)
    hi: int
    streams: range  # the streams those rows come from
    owned: list[int]  # the streams whose first row is this host's: it counts their bad samples and saves them

    @classmethod
    def of(cls, global_batch_size: int, num_streams: int, process_index: int, process_count: int) -> HostLayout:
        r = global_batch_size // num_streams
        b = global_batch_size // process_count
        lo, hi = process_index * b, (process_index + 1) * b
        streams = range(lo // r, -(-hi // r))
        return cls(r, lo, hi, streams, [s for s in streams if lo <= s * r < hi])


class _RowStream:
    """One virtual stream: its ``rows_per_stream`` rows of every global batch, drawn from its per-dataset streams
    (mixed per row by its own generator, or the dataset chosen for the batch)."""

    def __init__(
        self,
        stream: int,
        datasets: list[_DecodedStream],
        weights: np.ndarray,
        manifests: list[str],
        *,
        seed: int,
        log: BadSampleLog,
    ) -> None:
        self.stream = stream
        self.datasets = datasets
        self._weights = weights
        self._manifests = manifests
        self._log = log
        self._mix_seed = _seed(seed, stream, 11)
        self.reset()

    def reset(self) -> None:
        self.mix = np.random.default_rng(self._mix_seed)
        self.snaps: list[dict | None] = [None] * len(self.datasets)
        self.skipped = [0] * len(self.datasets)
        self.out = [False] * len(self.datasets)
        self.bad_samples = 0  # counted in the batches returned so far

    def _take(self, d: int, counts: list[int], notes: list[str]) -> dict | None:
        """The next good element of dataset ``d`` (bad ones counted into ``counts`` / ``notes``); None at its end."""
        consecutive = 0
        stream = self.datasets[d]
        while True:
            got = stream.next()
            if got is None:  # the end: count the shards skipped on the way there
                counts[0] += stream.stream.skipped - self.skipped[d]
                self.skipped[d] = stream.stream.skipped
                return None
            element, snap = got
            self.snaps[d] = snap
            if snap["skipped"] > self.skipped[d]:  # unreadable shards met on the way: counted as bad samples
                counts[0] += snap["skipped"] - self.skipped[d]
                notes.append(f"unreadable shard(s) of {self._manifests[d]!r} (see the warning)")
                self.skipped[d] = snap["skipped"]
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

    def _row(self, choice: int | None, counts: list[int], notes: list[str]) -> tuple[dict | None, int | None]:
        """A row and the dataset it came from; ``(None, d)`` when dataset ``d`` (or every one: None) ran out."""
        if choice is not None:
            return self._take(choice, counts, notes), choice
        while True:
            live = np.where(self.out, 0.0, self._weights)
            if live.sum() <= 0:
                return None, None
            d = int(np.searchsorted(np.cumsum(live / live.sum()), self.mix.random(), side="right"))
            d = min(d, len(live) - 1)
            element = self._take(d, counts, notes)
            if element is not None:
                return element, d
            self.out[d] = True

    def rows(self, count: int, choice: int | None) -> tuple[list[dict | None], int | None, int, list[str]]:
        """``count`` rows (``choice``: the batch's dataset, or None to mix per row), the dataset that ran out
        (-1: every one) if one did, the bad samples skipped for them and notes on those."""
        counts, notes, out = [0], [], []
        for _ in range(count):
            row, d = self._row(choice, counts, notes)
            if row is None:
                return out, -1 if d is None else d, counts[0], notes
            out.append(row)
        self.bad_samples += counts[0]
        return out, None, counts[0], notes

    def state(self) -> dict[str, Any]:
        return {
            "mix_rng": self.mix.bit_generator.state,
            "datasets": self.snaps,
            "skipped": self.skipped,
            "exhausted": self.out,
            "bad_samples": self.bad_samples,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.reset()
        self.mix.bit_generator.state = state["mix_rng"]
        self.skipped = [int(x) for x in state["skipped"]]
        self.out = [bool(x) for x in state["exhausted"]]
        self.bad_samples = int(state["bad_samples"])
        for d, snap in enumerate(state["datasets"]):
            self.snaps[d] = snap
            self.datasets[d].restore(snap)


class StreamingTrainIterator(BadSampleCounters, Iterator[dict[str, np.ndarray]]):
    """This host's batches, read by streaming (same batch layout, counters and state API as ``TrainIterator``).

    ``get_state()`` is a *global* position (every stream's), so it can be restored with any process count."""

    reader = "streaming"

    def __init__(
        self,
        streams: list[_RowStream],
        *,
        layout: HostLayout,
        manifests: list[str],
        choices: np.ndarray | None,
        batch_datasets: np.ndarray | None,
        num_batches: int,
        fingerprint: StreamFingerprint,
        process_index: int,
        process_count: int,
        dataset_sizes: list[int],
        budget: BadSampleBudget,
        log: BadSampleLog,
        pools: list[concurrent.futures.Executor],
    ) -> None:
        self._streams = streams  # the streams this host reads, in order (layout.streams)
        self._layout = layout
        self._manifests = manifests
        self._choices = choices  # per-batch dataset (position in the datasets), or None: mixed per sample
        self.batch_datasets = batch_datasets  # the same as manifest indices (as TrainIterator.batch_datasets)
        self.num_batches = num_batches
        self.host_batch_size = layout.hi - layout.lo
        self.global_batch_size = fingerprint.global_batch_size
        self.num_streams = fingerprint.num_streams
        self.seq_len = fingerprint.seq_len
        self.process_index = process_index
        self.process_count = process_count
        self.dataset_sizes = dataset_sizes  # samples per epoch of each dataset read (manifest num_sequences)
        self._fingerprint = fingerprint
        self._budget = budget
        self._log = log
        self._pools = pools
        self._next = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> StreamingTrainIterator:
        return self

    # ------------------------------------------------------------ batches

    def _ran_out(self, stream: _RowStream, d: int, bad: int) -> DataError:
        which = f"dataset {self._manifests[d]!r}" if d >= 0 else "every dataset"
        return DataError(
            f"Streaming data ran out at batch {self._next} of {self.num_batches}: {which} has no more samples in "
            f"stream {stream.stream} of {self.num_streams} (data.num_streams; {stream.bad_samples + bad} bad "
            f"sample(s) skipped so far in it, unreadable shards included: {self._log.shards_summary() or 'none'}; "
            "or shards hold fewer samples than their num_sequences say). Fix or remove those shards, set "
            "data.allow_multiple_epochs = True, or lower experiment.total_train_samples."
        )

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next >= self.num_batches:
            raise StopIteration
        choice = int(self._choices[self._next]) if self._choices is not None else None
        for stream in self._streams:  # every stream's next shard is read in parallel (start-up, shard ends)
            for d in stream.datasets:
                d.stream.prefetch()
        rows: list[dict] = []
        bad, notes = 0, []
        for stream in self._streams:
            got, ran_out, count, why = stream.rows(self._layout.rows_per_stream, choice)
            if ran_out is not None:
                raise self._ran_out(stream, ran_out, count)
            rows += got
            if stream.stream in self._layout.owned:
                bad, notes = bad + count, notes + why
        start = self._layout.lo - self._layout.streams.start * self._layout.rows_per_stream
        rows = rows[start : start + self.host_batch_size]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch[BAD_SAMPLES_KEY] = np.int32(bad)
        batch[BAD_SAMPLE_NOTE_KEY] = np.str_(notes[0] if notes else "")
        batch = self._budget.take(batch)
        self._next += 1
        if self._next == self.num_batches:
            self.close()
            if summary := self._budget.summary():
                logging.warning("Data iterator finished: %s", summary)
        return batch

    # ------------------------------------------------------------ state

    def get_state(self) -> dict[str, Any]:
        """Every stream's position (each from the host holding its first row, gathered across processes)."""
        owned = {str(s.stream): s.state() for s in self._streams if s.stream in self._layout.owned}
        streams: dict[str, Any] = {}
        for host in gather_host_states(self.process_index, owned).values():
            streams.update(host)
        return {
            "version": STATE_VERSION,
            "reader": self.reader,
            "fingerprint": dataclasses.asdict(self._fingerprint),
            "next_batch": self._next,
            "streams": dict(sorted(streams.items(), key=lambda kv: int(kv[0]))),
        }

    def set_state(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue exactly where ``state`` (from ``get_state``, any host count) stopped. A state of another
        reader, data, seed or stream count raises (``strict``) or warns: its positions would mean other samples."""
        if state.get("reader") != self.reader:
            raise DataError(
                f"The saved data iterator state was written by the {state.get('reader', 'random-access')} reader; "
                "this run streams (data.streaming = True). Resume with the same data.streaming setting as the "
                "saved run."
            )
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"The saved data iterator state is version {state.get('version')} of the streaming reader (this one "
                f"writes {STATE_VERSION}: since version 2 the batches no longer depend on the host count, so an "
                "older position means other samples). Start the run afresh in a new experiment.output_dir."
            )
        saved, mine = state.get("fingerprint", {}), dataclasses.asdict(self._fingerprint)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if json.dumps(saved.get(k)) != json.dumps(v)}
        if diff:
            msg = "Restored data iterator state comes from a different pipeline (saved, now): " + ", ".join(
                f"{k}={s!r} vs {n!r}" for k, (s, n) in diff.items()
            )
            fix = "; the saved position would not continue the same sample sequence."
            if "num_streams" in diff and len(diff) == 1:
                fix = (
                    f"; set data.num_streams = {saved.get('num_streams')} (the saved run's, whatever the host count) "
                    "to continue it."
                )
            if strict:
                raise DataError(msg + fix)
            logging.warning("%s; continuing anyway.", msg)
        saved_streams = state.get("streams", {})
        missing = [s.stream for s in self._streams if str(s.stream) not in saved_streams]
        if missing:
            raise DataError(
                f"The saved data iterator state has no position for stream(s) {missing} (it holds "
                f"{len(saved_streams)} of data.num_streams = {self.num_streams}); the checkpoint's data state is "
                "incomplete: resume from an earlier checkpoint."
            )
        self._next = int(state["next_batch"])
        with concurrent.futures.ThreadPoolExecutor(min(16, len(self._streams)), "restore") as pool:
            # each stream re-reads the shards of its buffered samples: every stream's reads at once
            list(pool.map(lambda stream: stream.restore(saved_streams[str(stream.stream)]), self._streams))
        self._budget.count = sum(s.bad_samples for s in self._streams if s.stream in self._layout.owned)

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
    budget: Callable[[int], BadSampleBudget],
    log: BadSampleLog,
) -> StreamingTrainIterator:
    """This host's streaming iterator over the manifests ``used`` (indices into ``data.dataset_manifest``, with
    their ``transforms``); ``batch_datasets``: per-batch dataset choice (positions in ``used``) or None (mix per
    sample); ``budget(planned)``: the bad-sample budget of the ``planned`` rows this host counts. Reads only the
    manifests."""
    manifests = [list(data.dataset_manifest)[i] for i in used]
    weights = np.asarray([float(data.weights[i]) for i in used], np.float64)
    entries = []
    for manifest in manifests:
        entries.append(read_manifest(manifest))
        unknown = [e.shard for e in entries[-1] if e.num_sequences is None]
        if unknown:
            raise DataError(
                f"Manifest {manifest!r}: {len(unknown)} line(s) have no num_sequences (first: shard {unknown[0]!r}); "
                "the streaming reader plans the run from them. Add them, or set data.streaming = False."
            )
    fewest = min(range(len(used)), key=lambda d: len(entries[d]))
    num_streams = data.num_streams or default_num_streams(global_batch_size, len(entries[fewest]))
    if global_batch_size % num_streams:
        raise DataError(
            f"data.num_streams = {num_streams} does not divide the global batch size {global_batch_size}: each "
            "stream fills the same number of rows of every batch. Set it to a divisor of the global batch, or "
            "leave it unset (the largest divisor up to 64 and the smallest dataset's shard count)."
        )
    if len(entries[fewest]) < num_streams:
        raise DataError(
            f"Dataset {manifests[fewest]!r} has {len(entries[fewest])} shard(s) for data.num_streams = "
            f"{num_streams}: each stream reads whole shards. Lower data.num_streams (or leave it unset), write the "
            "dataset in more shards, or set data.streaming = False."
        )
    layout = HostLayout.of(global_batch_size, num_streams, process_index, process_count)
    r = layout.rows_per_stream
    threads = data.num_workers if data.num_workers is not None else min(16, data.prefetch_factor)
    decode_pool = concurrent.futures.ThreadPoolExecutor(threads, "decode") if threads and data.prefetch_factor else None
    read_ahead = READ_AHEAD if len(layout.streams) == 1 else 1
    io_threads = min(32, max(2, (read_ahead + 1) * len(layout.streams) * len(used)))
    io_pool = concurrent.futures.ThreadPoolExecutor(io_threads, "shard-read")
    window = r * max(1, data.prefetch_factor) if decode_pool is not None else 1

    def shard_stream(d: int, s: int) -> ShardStream:
        return ShardStream(
            entries[d],
            seed=data.seed,
            index=used[d],
            stream=s,
            num_streams=num_streams,
            shuffle=data.shuffle,
            buffer_size=data.shuffle_buffer_size,
            initial=data.shuffle_initial,
            repeat=data.allow_multiple_epochs,
            log=log,
            io_pool=io_pool,
            read_ahead=read_ahead,
        )

    if not data.allow_multiple_epochs:  # every stream, read here or not: the check does not depend on the hosts
        advice = "Set data.allow_multiple_epochs = True to repeat it, or lower experiment.total_train_samples."
        for s in range(num_streams):
            have = [shard_stream(d, s).planned_samples for d in range(len(used))]
            if batch_datasets is None and sum(have) < num_batches * r:
                raise DataError(
                    f"Not enough training data: {num_batches} batches x {r} rows per stream need {num_batches * r} "
                    f"samples in each of the {num_streams} streams (data.num_streams), stream {s} holds {sum(have)} "
                    f"(its shards by the manifests' num_sequences: {dict(zip(manifests, have, strict=True))}). "
                    f"{advice}"
                )
            for d, n in enumerate(have):
                need = int((batch_datasets == d).sum()) * r if batch_datasets is not None else 0
                if need > n:
                    raise DataError(
                        f"Not enough training data: dataset {manifests[d]!r} is picked for {need // r} batches and "
                        f"needs {need} samples in each of the {num_streams} streams (data.num_streams), stream {s}'s "
                        f"shards hold {n}. {advice}"
                    )
    streams = [
        _RowStream(
            s,
            [_DecodedStream(shard_stream(d, s), transforms[d], decode_pool, window) for d in range(len(used))],
            weights,
            manifests,
            seed=data.seed,
            log=log,
        )
        for s in layout.streams
    ]
    fingerprint = StreamFingerprint(
        manifests=list(data.dataset_manifest),
        weights=[float(w) for w in data.weights],
        modalities=list(data.modalities),
        seq_len=data.seq_len,
        seed=data.seed,
        shuffle=data.shuffle,
        global_batch_size=global_batch_size,
        num_streams=num_streams,
        shuffle_buffer_size=data.shuffle_buffer_size,
        shuffle_initial=data.shuffle_initial,
    )
    return StreamingTrainIterator(
        streams,
        layout=layout,
        manifests=manifests,
        choices=batch_datasets,
        batch_datasets=None if batch_datasets is None else np.asarray(used, np.int64)[batch_datasets],
        num_batches=num_batches,
        fingerprint=fingerprint,
        process_index=process_index,
        process_count=process_count,
        dataset_sizes=[sum(e.num_sequences or 0 for e in es) for es in entries],
        budget=budget(num_batches * r * len(layout.owned)),
        log=log,
        pools=[p for p in (decode_pool, io_pool) if p is not None],
    )
