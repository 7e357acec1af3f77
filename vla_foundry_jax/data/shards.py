"""Random-access reading of VLA Foundry datasets: ``manifest.jsonl`` + webdataset-style tar shards.

On-disk format (the original's): ``manifest.jsonl`` holds one JSON object per line,
``{"shard": "<name without .tar>", "num_sequences": N}``; the shard file is ``<dir of manifest>/<shard>.tar``.
Tar members are grouped webdataset-style: the sample key is the member path up to the first dot of its
basename and the rest is the field (``000123.json.gz`` -> key ``000123``, field ``json.gz``); consecutive
members with the same key form one sample.

Manifests and shards may be local paths, ``s3://``, ``gs://`` or ``hf://`` (``paths``). Two readers use this
module: ``data.streaming`` reads each shard whole (``parse_shard``) and trusts the manifest's counts until a
shard is read; the random-access ``ShardDataSource`` (evaluation, and training without ``data.streaming``) works
on local files (remote shards are copied into the path cache first) and indexes every shard
once (member headers only, via ``tarfile``: no member data is read) and serves sample ``i`` by reading just
that sample's members at their recorded offsets. ``len()`` is the number of samples actually found in the
tars; ``num_sequences`` is checked against it (the original never checks it, and its tiny text shards claim 512
samples but hold 32): a shard that differs is named in one warning with both counts, and an empty shard whose
manifest line claims samples is a ``DataError`` (a failed copy or write, not a dataset choice). A tar cut short
(copy interrupted) keeps the samples before the cut, with a warning; a member whose bytes run past the end of
the file is read as a bad sample (``BadSampleError``; see ``data.bad_samples`` for the skip policy).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import tarfile
import zipfile
from collections.abc import Sequence

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.errors import VLAFoundryError

logger = logging.getLogger(__name__)


class DataError(VLAFoundryError, ValueError):
    """A dataset on disk is missing or malformed; the message names the file and what to check."""


class BadSampleError(DataError):
    """One sample cannot be used (corrupt, undecodable or incomplete bytes); the pipeline skips it (see
    ``data.bad_samples``). ``shard`` and ``key`` name it (the ``__shard__`` / ``__key__`` of the raw sample)."""

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.key = key

    @classmethod
    def of(cls, sample: dict, message: str) -> BadSampleError:
        """The error for the raw ``sample`` (its ``__shard__`` and ``__key__``)."""
        return cls(message, shard=sample.get("__shard__"), key=sample.get("__key__"))

    def __reduce__(self):  # keep shard / key when the error crosses a thread or process boundary
        return (_rebuild_bad_sample_error, (type(self), str(self), self.shard, self.key))


def _rebuild_bad_sample_error(cls: type, message: str, shard: str | None, key: str | None) -> BadSampleError:
    return cls(message, shard=shard, key=key)


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    shard: str
    num_sequences: int | None  # None when the manifest line has no num_sequences
    path: str


def read_manifest(manifest_path: str) -> list[ManifestEntry]:
    """Parse ``manifest.jsonl`` (a local path, ``s3://``, ``gs://`` or ``hf://``); shards resolve next to it."""
    try:
        paths.scheme(manifest_path)
        text = paths.read_text(manifest_path)
    except paths.PathError as e:
        if "no such file" in str(e):
            raise DataError(
                f"Dataset manifest not found: {manifest_path!r} (cwd {os.getcwd()!r}). "
                "Check data.dataset_manifest: each entry must be the path of a manifest.jsonl file."
            ) from None
        raise DataError(f"Dataset manifest {manifest_path!r}: {e}") from None
    root = paths.dirname(manifest_path)
    entries: list[ManifestEntry] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            shard = str(obj["shard"])
            num = None if obj.get("num_sequences") is None else int(obj["num_sequences"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{manifest_path}:{lineno}: expected a JSON object with a 'shard' name and 'num_sequences', "
                f"got {line[:200]!r} ({e})."
            ) from e
        entries.append(ManifestEntry(shard, num, paths.join(root, shard + ".tar")))
    if not entries:
        raise DataError(f"Dataset manifest {manifest_path!r} lists no shards (empty file?).")
    return entries


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/000123.json.gz`` -> ``("dir/000123", "json.gz")``; None for names without a field (skipped)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :]


@dataclasses.dataclass
class _ShardIndex:
    """Samples of one shard: ``keys[s]`` owns members ``starts[s]:starts[s+1]`` of the member arrays."""

    keys: list[str]
    starts: np.ndarray  # int64 [num_samples + 1]
    fields: list[str]  # per member
    offsets: np.ndarray  # int64 per member: byte offset of the member data
    sizes: np.ndarray  # int64 per member
    truncated: str | None = None  # why reading the headers stopped early (a tar cut short), else None


def index_shard(path: str) -> _ShardIndex:
    """Read the member headers of one uncompressed tar and group members into samples."""
    keys: list[str] = []
    starts: list[int] = []
    fields: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    truncated = None
    if os.path.getsize(path) == 0:  # an empty file: no samples (checked against the manifest by the source)
        return _ShardIndex([], np.zeros(1, np.int64), [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:  # iterating reads headers and seeks past the data
                if not info.isfile():
                    continue
                split = split_member_name(info.name)
                if split is None:
                    continue
                key, field = split
                if not keys or keys[-1] != key:
                    keys.append(key)
                    starts.append(len(fields))
                fields.append(field)
                offsets.append(info.offset_data)
                sizes.append(info.size)
    except tarfile.ReadError as e:
        if not fields:
            raise DataError(f"Cannot read shard {path!r} as an uncompressed tar file: {e}") from e
        truncated = str(e)  # members before the cut are usable; a short last member reads as a bad sample
    starts.append(len(fields))
    return _ShardIndex(
        keys=keys,
        starts=np.asarray(starts, np.int64),
        fields=fields,
        offsets=np.asarray(offsets, np.int64),
        sizes=np.asarray(sizes, np.int64),
        truncated=truncated,
    )


def parse_shard(data: bytes, path: str) -> tuple[list[dict[str, bytes | str]], str | None]:
    """The samples of one whole uncompressed tar held in memory (the streaming reader's unit of I/O), in tar order.

    Returns ``(samples, truncated)``: each sample is ``{"__key__", "__shard__" (the shard file's name without .tar),
    field: bytes}``; ``truncated`` says why parsing stopped early (a tar cut short), else None. A sample whose member
    runs past the end of the bytes carries ``"__error__"`` (read as a bad sample); an empty object has no samples.
    """
    shard = paths.basename(path).removesuffix(".tar")
    samples: list[dict[str, bytes | str]] = []
    truncated = None
    if not data:
        return samples, None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                split = split_member_name(info.name)
                if split is None:
                    continue
                key, field = split
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key, "__shard__": shard})
                member = data[info.offset_data : info.offset_data + info.size]
                if len(member) != info.size:
                    samples[-1]["__error__"] = (
                        f"sample {key!r} of shard {path!r}: member {field!r} is cut short ({len(member)} of "
                        f"{info.size} bytes; the tar file is truncated)."
                    )
                samples[-1][field] = member
    except tarfile.ReadError as e:
        if not samples:
            raise DataError(f"Cannot read shard {path!r} as an uncompressed tar file: {e}") from e
        truncated = str(e)
    return samples, truncated


class ShardDataSource:
    """grain random-access source over one VLA Foundry manifest.

    ``source[i]`` returns ``{"__key__": key, "__shard__": shard name, field: bytes, ...}`` for the i-th
    sample in manifest order (shard order, then tar order). Reads open the shard file per call, so the
    source holds no file handles: it pickles cheaply and is safe to use from grain's reader threads.
    """

    def __init__(self, manifest_path: str, *, index_threads: int = 8) -> None:
        self.manifest_path = manifest_path
        self.entries = read_manifest(manifest_path)
        workers = max(1, min(index_threads, len(self.entries)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            self._local = list(pool.map(self._local_copy, self.entries))
            self._shards = list(pool.map(index_shard, self._local))
        counts = [len(s.keys) for s in self._shards]
        self._cum = np.cumsum([0, *counts]).tolist()
        self._paths = {e.shard: e.path for e in self.entries}
        self._check_counts(counts)
        if self._cum[-1] == 0:
            raise DataError(f"Dataset {manifest_path!r}: its {len(self.entries)} shard(s) contain no samples.")

    def _local_copy(self, entry: ManifestEntry) -> str:
        """The shard as a local file: itself, or a copy in the path cache (downloaded once) for a remote one."""
        try:
            local = paths.local_file(entry.path)
        except paths.PathError as e:
            local, why = None, str(e)
        else:
            why = ""
        if local is None or not os.path.isfile(local):
            raise DataError(
                f"Shard {entry.shard!r} listed in manifest {self.manifest_path!r} not found: expected file "
                f"{entry.path!r}{f' ({why})' if why else ''}."
            )
        return local

    def _check_counts(self, counts: list[int]) -> None:
        """Empty shards the manifest says hold samples raise; other count mismatches and cut tars warn (once)."""
        empty = [(e, n) for e, n in zip(self.entries, counts, strict=True) if n == 0 and (e.num_sequences or 0) > 0]
        if empty:
            e = empty[0][0]
            more = f" ({len(empty) - 1} more shard(s) like it)" if len(empty) > 1 else ""
            raise DataError(
                f"Shard {e.path!r} holds no samples but manifest {self.manifest_path!r} says num_sequences = "
                f"{e.num_sequences}{more}: the file is empty or not a webdataset tar (an interrupted copy?). "
                "Regenerate the shard, or remove its line from the manifest."
            )
        odd = [
            f"{e.path} (manifest {e.num_sequences}, found {n})"
            for e, n in zip(self.entries, counts, strict=True)
            if e.num_sequences is not None and e.num_sequences != n
        ]
        if odd:
            shown = "; ".join(odd[:5]) + (f"; and {len(odd) - 5} more" if len(odd) > 5 else "")
            logger.warning(
                "Manifest %s: %d shard(s) hold a different number of samples than its num_sequences says: %s. "
                "Using the samples found.",
                self.manifest_path,
                len(odd),
                shown,
            )
        for e, idx in zip(self.entries, self._shards, strict=True):
            if idx.truncated:
                logger.warning(
                    "Shard %s is cut short (%s): using its first %d sample(s); a sample cut in the middle is "
                    "skipped as a bad sample.",
                    e.path,
                    idx.truncated,
                    len(idx.keys),
                )

    def shard_path(self, shard: str) -> str:
        """The file of the shard named ``shard`` in the manifest (the ``__shard__`` of its samples)."""
        return self._paths.get(shard, shard)

    def __len__(self) -> int:
        return self._cum[-1]

    @property
    def samples_per_shard(self) -> list[int]:
        """Samples actually found in each shard (what is read; the manifest's num_sequences is only checked)."""
        return [len(s.keys) for s in self._shards]

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (shard number, sample number within the shard)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"Sample index {index} out of range for {self.manifest_path!r} ({n} samples).")
        index %= n
        shard = bisect.bisect_right(self._cum, index) - 1
        return shard, index - self._cum[shard]

    def __getitem__(self, index: int) -> dict[str, bytes | str]:
        shard, local = self.locate(int(index))
        idx = self._shards[shard]
        lo, hi = int(idx.starts[local]), int(idx.starts[local + 1])
        sample: dict[str, bytes | str] = {"__key__": idx.keys[local], "__shard__": self.entries[shard].shard}
        with open(self._local[shard], "rb") as f:
            for m in range(lo, hi):
                f.seek(int(idx.offsets[m]))
                size = int(idx.sizes[m])
                data = f.read(size)
                if len(data) != size:
                    raise BadSampleError.of(
                        sample,
                        f"sample {idx.keys[local]!r} of shard {self.entries[shard].path!r}: member "
                        f"{idx.fields[m]!r} is cut short ({len(data)} of {size} bytes; the tar file is truncated).",
                    )
                sample[idx.fields[m]] = data
        return sample

    def __repr__(self) -> str:
        return f"ShardDataSource({self.manifest_path!r}, shards={len(self.entries)}, samples={len(self)})"


def write_shards(
    out_dir: str,
    samples: Sequence[dict[str, bytes]],
    *,
    samples_per_shard: int,
    prefix: str = "shard-",
) -> str:
    """Write ``samples`` (each ``{"__key__": key, field: bytes}``) as tar shards plus ``manifest.jsonl``.

    Deterministic bytes (fixed mtime/owner), so regenerated assets do not churn. Returns the manifest path.
    """
    import io

    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for s, start in enumerate(range(0, len(samples), samples_per_shard)):
        name = f"{prefix}{s:04d}"
        chunk = samples[start : start + samples_per_shard]
        with tarfile.open(os.path.join(out_dir, name + ".tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in chunk:
                key = sample["__key__"]
                for field, data in sample.items():
                    if field == "__key__":
                        continue
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
        lines.append(json.dumps({"shard": name, "num_sequences": len(chunk)}))
    manifest = os.path.join(out_dir, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return manifest


_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` bytes with fixed zip timestamps (a shard member; rewriting gives the same bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    return buf.getvalue()
