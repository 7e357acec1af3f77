"""Reading LeRobot datasets (v2.0 / v2.1 and v3.0 layouts) with pyarrow and PyAV: no torch, no ``lerobot`` package.

Layouts (``meta/info.json`` ``codebase_version`` decides; path templates come from its ``data_path`` /
``video_path``):

* **v2.0 / v2.1**: one parquet file per episode, ``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}
  .parquet``, one mp4 per episode and camera, ``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:
  06d}.mp4`` (``episode_chunk = episode_index // chunks_size``); ``meta/episodes.jsonl`` (``episode_index``,
  ``tasks``, ``length``) and ``meta/tasks.jsonl`` (``task_index``, ``task``). A video starts at time 0.
* **v3.0**: many episodes per file, ``data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet`` and
  ``videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4``; ``meta/episodes/chunk-*/file-*.parquet``
  rows give each episode's ``length``, ``tasks``, ``data/chunk_index``, ``data/file_index`` and, per camera,
  ``videos/{key}/chunk_index``, ``videos/{key}/file_index`` and ``videos/{key}/from_timestamp`` (where the episode
  starts in the concatenated mp4); ``meta/tasks.parquet`` maps task strings (the pandas index) to ``task_index``.

Frame rows carry ``timestamp`` (seconds from the episode start), ``frame_index``, ``episode_index``, ``index``,
``task_index`` and the features of ``info["features"]``: numeric ones (``dtype`` float*/int*/bool, shape ``[d]``;
scalars become ``[L, 1]``) are low-dim fields, ``dtype: video`` ones are cameras decoded from mp4 (frame of row
``i`` = the decoded frame nearest ``from_timestamp + timestamp[i]``, within ``tolerance_s``, default half a frame
period), ``dtype: image`` ones are cameras stored in the parquet (PNG/JPEG bytes).

Sources (:func:`resolve_lerobot_source`): a local directory; an ``s3://``, ``gs://`` or ``hf://`` URL (through the
path layer, ``vla_foundry_jax.paths``: copied into a local cache directory, again whenever its objects change);
or a hub dataset id ``org/name`` fetched through
``huggingface_hub.snapshot_download(repo_type="dataset")`` (cache first; offline, the error says how to download it
and point ``--source`` at the copy).

Errors are :class:`LeRobotError` (a ``DataError``: a ``VLAFoundryError`` and a ``ValueError``) naming the
episode / field / file and the fix.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.data.shards import DataError

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
NUMERIC_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


class LeRobotError(DataError):
    """A LeRobot dataset that cannot be read as asked; the message names the episode / field / file and the fix."""


@dataclasses.dataclass(frozen=True)
class EpisodeInfo:
    """Where one episode lives: its parquet file and, per video camera, ``(mp4 path, start time in that file)``."""

    index: int
    length: int
    tasks: tuple[str, ...]
    data_file: str
    videos: dict[str, tuple[str, float]]


# ---------------------------------------------------------------- source resolution


def _offline_error(repo_id: str, why: str) -> LeRobotError:
    return LeRobotError(
        f"LeRobot dataset {repo_id!r} could not be fetched from the Hugging Face hub ({why}). On a machine with "
        f"network access run `huggingface-cli download {repo_id} --repo-type dataset --local-dir <dir>` (or "
        f"`huggingface_hub.snapshot_download({repo_id!r}, repo_type='dataset', local_dir=<dir>)`), copy <dir> here "
        "and pass --source=<dir>."
    )


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    import huggingface_hub
    from huggingface_hub import constants

    kw = {"repo_type": "dataset", "revision": revision, "cache_dir": cache_dir}
    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kw)
    except Exception as cached_error:  # not in the cache
        if offline:
            raise _offline_error(repo_id, "HF_HUB_OFFLINE is set and it is not in the cache") from cached_error
    try:
        return huggingface_hub.snapshot_download(repo_id, **kw)
    except Exception as e:
        raise _offline_error(repo_id, f"{type(e).__name__}: {e}") from e


def _remote_copy(url: str, cache_dir: str | None) -> str:
    """A local, completed copy of the dataset at ``url`` (re-fetched when its objects change), via the path layer."""
    try:
        found = paths.exists(paths.join(url, "meta/info.json"))
    except paths.PathError as e:
        raise LeRobotError(f"--source: {e}") from e
    if not found:
        raise LeRobotError(f"--source={url!r}: no meta/info.json there; give the root directory of a LeRobot dataset.")
    return paths.local_dir(url, cache_dir)


def resolve_lerobot_source(source: str, *, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local directory holding the LeRobot dataset ``source`` names (directory, fsspec URL or hub dataset id)."""
    if not source:
        raise LeRobotError("--source is empty: give a LeRobot dataset directory, an fsspec URL or a hub id (org/name).")
    if "://" in source and not source.startswith("file://"):
        return _remote_copy(source, cache_dir)
    local = os.path.abspath(os.path.expanduser(source.removeprefix("file://")))
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise LeRobotError(
            f"--source={source!r} is a file; give the dataset's root directory (holding meta/info.json)."
        )
    if source.startswith((".", "/", "~", "file://")) or source.count("/") != 1:
        raise LeRobotError(f"--source={source!r}: no such directory (and not a hub dataset id org/name).")
    return _hub_snapshot(source, revision, cache_dir)


# ---------------------------------------------------------------- metadata


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LeRobotError(f"cannot read {path}: {e}") from e


def _read_jsonl(path: str) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise LeRobotError(f"{path}:{lineno} is not valid JSON: {e}") from e
    except OSError as e:
        raise LeRobotError(f"cannot read {path}: {e}") from e
    return out


def _read_parquet(path: str, **kw) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, **kw)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise LeRobotError(f"cannot read parquet file {path}: {e}") from e


class LeRobotDataset:
    """Metadata and per-episode reading of one LeRobot dataset at a local ``root`` (see the module docstring).

    ``episodes``: ``{episode_index: EpisodeInfo}``; ``cameras``: video / image feature names; ``lowdim_fields``:
    numeric feature names (not the index columns); ``tasks``: ``{task_index: task}``; ``fps``; ``version``.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._table_cache: tuple[tuple, Any] | None = None
        info_path = os.path.join(root, "meta", "info.json")
        if not os.path.isfile(info_path):
            raise LeRobotError(
                f"{root} has no meta/info.json: not a LeRobot dataset root (v2.x / v3.0). Point --source at the "
                "directory holding meta/, data/ and videos/."
            )
        self.info = _read_json(info_path)
        version = str(self.info.get("codebase_version", ""))
        if version not in SUPPORTED_VERSIONS:
            hint = (
                " Convert it to v2.1 / v3.0 first with lerobot's converter (e.g. `python -m "
                "lerobot.datasets.v30.convert_dataset_v21_to_v30`, or the v1 -> v2 script for older data)."
            )
            raise LeRobotError(
                f"{info_path}: unknown LeRobot version codebase_version = {version or None!r}; supported: "
                f"{list(SUPPORTED_VERSIONS)}.{hint}"
            )
        self.version = version
        self.features: dict[str, dict] = dict(self.info.get("features") or {})
        if not self.features:
            raise LeRobotError(f"{info_path} lists no features.")
        fps = self.info.get("fps")
        self.fps = float(fps) if fps else None
        self.cameras = [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]
        self.video_cameras = [k for k in self.cameras if self.features[k].get("dtype") == "video"]
        self.lowdim_fields = [
            k for k, f in self.features.items() if f.get("dtype") in NUMERIC_DTYPES and k not in INDEX_COLUMNS
        ]
        if version == "v3.0":
            self.tasks = self._v3_tasks()
            self.episodes = self._v3_episodes()
        else:
            self.tasks = self._v2_tasks()
            self.episodes = self._v2_episodes()

    # -- v2.x
    def _v2_tasks(self) -> dict[int, str]:
        path = os.path.join(self.root, "meta", "tasks.jsonl")
        if not os.path.isfile(path):
            return {}
        return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(path)}

    def _v2_episodes(self) -> dict[int, EpisodeInfo]:
        path = os.path.join(self.root, "meta", "episodes.jsonl")
        if not os.path.isfile(path):
            raise LeRobotError(f"{self.root} is a LeRobot {self.version} dataset without meta/episodes.jsonl.")
        chunks_size = int(self.info.get("chunks_size") or 1000)
        data_tpl = self.info.get("data_path") or V2_DATA_PATH
        video_tpl = self.info.get("video_path") or V2_VIDEO_PATH
        out = {}
        for row in _read_jsonl(path):
            idx = int(row["episode_index"])
            chunk = idx // chunks_size
            videos = {
                cam: (video_tpl.format(episode_chunk=chunk, video_key=cam, episode_index=idx), 0.0)
                for cam in self.video_cameras
            }
            tasks = row.get("tasks") or []
            out[idx] = EpisodeInfo(
                index=idx,
                length=int(row.get("length", -1)),
                tasks=tuple([tasks] if isinstance(tasks, str) else tasks),
                data_file=data_tpl.format(episode_chunk=chunk, episode_index=idx),
                videos=videos,
            )
        return dict(sorted(out.items()))

    # -- v3.0
    def _v3_tasks(self) -> dict[int, str]:
        path = os.path.join(self.root, "meta", "tasks.parquet")
        if not os.path.isfile(path):
            return {}
        table = _read_parquet(path)
        cols = table.column_names
        if "task_index" not in cols:
            raise LeRobotError(f"{path} has no task_index column (columns: {cols}).")
        text_col = "task" if "task" in cols else next((c for c in cols if c != "task_index"), None)
        if text_col is None:
            raise LeRobotError(f"{path} has no task text column (columns: {cols}).")
        return {
            int(i): str(t)
            for i, t in zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist(), strict=True)
        }

    def _v3_episodes(self) -> dict[int, EpisodeInfo]:
        files = sorted(glob.glob(os.path.join(self.root, "meta", "episodes", "**", "*.parquet"), recursive=True))
        if not files:
            raise LeRobotError(f"{self.root} is a LeRobot v3.0 dataset without meta/episodes/chunk-*/file-*.parquet.")
        data_tpl = self.info.get("data_path") or V3_DATA_PATH
        video_tpl = self.info.get("video_path") or V3_VIDEO_PATH
        out = {}
        for path in files:
            table = _read_parquet(path)
            cols = set(table.column_names)
            need = {"episode_index", "length", "data/chunk_index", "data/file_index"}
            for cam in self.video_cameras:
                need |= {f"videos/{cam}/chunk_index", f"videos/{cam}/file_index", f"videos/{cam}/from_timestamp"}
            missing = sorted(need - cols)
            if missing:
                raise LeRobotError(
                    f"{path} lacks the v3.0 episode columns {missing}; is meta/info.json's version right?"
                )
            for row in table.select(sorted(need | ({"tasks"} & cols))).to_pylist():
                idx = int(row["episode_index"])
                videos = {
                    cam: (
                        video_tpl.format(
                            video_key=cam,
                            chunk_index=int(row[f"videos/{cam}/chunk_index"]),
                            file_index=int(row[f"videos/{cam}/file_index"]),
                        ),
                        float(row[f"videos/{cam}/from_timestamp"]),
                    )
                    for cam in self.video_cameras
                }
                tasks = row.get("tasks") or []
                out[idx] = EpisodeInfo(
                    index=idx,
                    length=int(row["length"]),
                    tasks=tuple([tasks] if isinstance(tasks, str) else tasks),
                    data_file=data_tpl.format(
                        chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"])
                    ),
                    videos=videos,
                )
        return dict(sorted(out.items()))

    # ---------------------------------------------------------------- checks
    def feature_dim(self, name: str) -> int:
        shape = self.features[name].get("shape") or [1]
        return int(np.prod(shape))

    def check_fields(self, cameras: Sequence[str], fields: Sequence[str], *, flag: str = "--action_fields") -> None:
        """Fail naming the first camera / low-dim field the dataset does not have (and what it has)."""
        for cam in cameras:
            if cam not in self.cameras:
                raise LeRobotError(
                    f"camera {cam!r} (--cameras) is not in the dataset {self.root}; its cameras: {self.cameras}. "
                    "Fix --cameras."
                )
        for name in fields:
            if name not in self.lowdim_fields:
                kind = (
                    f"a {self.features[name].get('dtype')} feature, not numeric" if name in self.features else "absent"
                )
                raise LeRobotError(
                    f"field {name!r} ({flag}) is {kind} in the dataset {self.root}; numeric fields there: "
                    f"{self.lowdim_fields}. Fix {flag}."
                )

    # ---------------------------------------------------------------- reading
    def read_episode(self, episode: int, fields: Sequence[str], image_cameras: Sequence[str] = ()) -> dict[str, Any]:
        """``{"timestamp": [L], "frame_index": [L], "task_index": [L] (when present), field: [L, d], camera: [bytes]}``
        for one episode, rows in frame order (``image`` cameras as their encoded bytes)."""
        import pyarrow.compute as pc

        ep = self.episodes[episode]
        path = os.path.join(self.root, ep.data_file)
        if not os.path.isfile(path):
            raise LeRobotError(f"episode {episode}: its data file {path} does not exist (dataset incomplete?).")
        columns = [c for c in INDEX_COLUMNS if c in self.features or c in ("timestamp", "episode_index")]
        import pyarrow.parquet as pq

        try:
            present = set(pq.read_schema(path).names)
        except (OSError, ValueError) as e:
            raise LeRobotError(f"episode {episode}: cannot read parquet file {path}: {e}") from e
        for name in [*fields, *image_cameras]:
            if name not in present:
                raise LeRobotError(
                    f"episode {episode}: column {name!r} is missing from {path} (columns: {sorted(present)}); fix the "
                    "field / camera flags or drop the episode with --skip_episodes."
                )
        columns = [c for c in dict.fromkeys([*columns, *fields, *image_cameras]) if c in present]
        key = (path, tuple(columns))
        if self._table_cache is not None and self._table_cache[0] == key:
            table = self._table_cache[1]  # v3.0: consecutive episodes share a file; read it once
        else:
            table = _read_parquet(path, columns=columns)
            self._table_cache = (key, table) if self.version == "v3.0" else None
        if "episode_index" in present and self.version == "v3.0":
            table = table.filter(pc.equal(table.column("episode_index"), episode))
        if "frame_index" in table.column_names:
            table = table.sort_by("frame_index")
        out: dict[str, Any] = {"num_rows": table.num_rows}
        for c in ("timestamp", "frame_index", "task_index"):
            if c in table.column_names:
                out[c] = table.column(c).to_numpy()
        if "timestamp" not in out:
            if not self.fps:
                raise LeRobotError(f"episode {episode}: {path} has no timestamp column and info.json no fps.")
            out["timestamp"] = np.arange(table.num_rows) / self.fps
        for name in fields:
            out[name] = _column_array(table.column(name), table.num_rows, f"episode {episode}, field {name!r}")
        for cam in image_cameras:
            values = table.column(cam).to_pylist()
            out[cam] = [v.get("bytes") if isinstance(v, dict) else v for v in values]
            if any(not isinstance(v, bytes) for v in out[cam]):
                raise LeRobotError(f"episode {episode}, camera {cam!r}: image cells without bytes in {path}.")
        return out

    def decode_video(
        self,
        episode: int,
        camera: str,
        timestamps: np.ndarray,
        *,
        transform: Callable[[np.ndarray], Any] | None = None,
        tolerance_s: float | None = None,
    ) -> list[Any]:
        """Frames of ``camera`` at the episode-relative ``timestamps`` (ascending), each through ``transform``."""
        ep = self.episodes[episode]
        rel, start = ep.videos[camera]
        path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            raise LeRobotError(
                f"episode {episode}, camera {camera!r}: video {path} does not exist; drop the camera (--cameras) or "
                "the episode (--skip_episodes)."
            )
        if tolerance_s is None:
            tolerance_s = 0.5 / self.fps if self.fps else 0.02
        return decode_video_frames(
            path,
            start + np.asarray(timestamps, np.float64),
            transform=transform,
            tolerance_s=tolerance_s,
            where=f"episode {episode}, camera {camera!r}",
            start=start,
        )


def _column_array(col: Any, rows: int, where: str) -> np.ndarray:
    """A parquet column of scalars or fixed-length lists -> ``[rows, d]``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        lengths = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if rows and (lengths != lengths[0]).any():
            raise LeRobotError(f"{where}: rows hold lists of different lengths ({sorted(set(lengths.tolist()))}).")
        flat = col.flatten()
        while pa.types.is_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
            flat = flat.flatten()
        arr = flat.to_numpy(zero_copy_only=False)
        return arr.reshape(rows, -1) if rows else arr.reshape(0, 0)
    arr = col.to_numpy(zero_copy_only=False)
    return arr.reshape(rows, 1)


def decode_video_frames(
    path: str,
    timestamps: np.ndarray,
    *,
    transform: Callable[[np.ndarray], Any] | None = None,
    tolerance_s: float,
    where: str,
    start: float = 0.0,
) -> list[Any]:
    """The decoded frames (RGB uint8 ``[H, W, 3]``, through ``transform``) nearest each of ``timestamps`` (seconds in
    the file, ascending); a timestamp with no frame within ``tolerance_s`` raises (video shorter than the data, or a
    dropped frame). Seeks to the first timestamp, then decodes forward once."""
    import av

    targets = np.asarray(timestamps, np.float64)
    n = len(targets)
    out: list[Any] = [None] * n
    if n == 0:
        return out
    if (np.diff(targets) < 0).any():
        raise LeRobotError(f"{where}: parquet timestamps are not increasing.")
    fn = transform or (lambda x: x)

    def take(frame: Any, j: int) -> None:
        t = float(frame.time)
        if abs(t - targets[j]) > tolerance_s:
            raise LeRobotError(
                f"{where}: no frame of {path} within {tolerance_s:.4f} s of timestamp {targets[j] - start:.4f} s "
                f"(row {j}; nearest frame at {t - start:.4f} s): the video is shorter than or out of step with the "
                "parquet timestamps. Re-encode the video, or drop the episode with --skip_episodes."
            )
        out[j] = fn(frame.to_ndarray(format="rgb24"))

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if targets[0] - tolerance_s > 0 and stream.time_base:
                container.seek(int((targets[0] - tolerance_s) / stream.time_base), stream=stream, backward=True)
            j, prev = 0, None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = float(frame.time)
                while j < n and t >= targets[j]:
                    use_prev = prev is not None and abs(float(prev.time) - targets[j]) < abs(t - targets[j])
                    take(prev if use_prev else frame, j)
                    j += 1
                if j == n:
                    break
                prev = frame
            if j < n:
                if prev is None:
                    raise LeRobotError(f"{where}: {path} holds no video frames near {targets[j] - start:.4f} s.")
                last = float(prev.time) - start
                if abs(float(prev.time) - targets[j]) > tolerance_s:
                    raise LeRobotError(
                        f"{where}: video {path} ends at {last:.4f} s but the parquet timestamps run to "
                        f"{targets[-1] - start:.4f} s (rows {j}..{n - 1} have no frame): the video is shorter than "
                        "the episode. Re-encode it, or drop the episode with --skip_episodes."
                    )
                while j < n:  # the last frame is within tolerance of the remaining targets
                    take(prev, j)
                    j += 1
    except av.error.FFmpegError as e:
        raise LeRobotError(f"{where}: cannot decode video {path}: {e}") from e
    return out


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """PNG / JPEG bytes of an ``image`` feature -> RGB uint8 ``[H, W, 3]``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise LeRobotError(f"{where}: cannot decode image: {e}") from e
