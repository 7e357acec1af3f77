"""A tiny LeRobot dataset written from scratch (pyarrow parquet + PyAV mp4), in the v2.x or v3.0 layout.

For tests and the conversion benchmark: ``write_tiny_lerobot(root, version="v3.0")`` writes ``num_episodes``
episodes of ``lengths`` frames at ``fps`` with ``cameras`` (``size x size`` RGB, H.264 yuv420p, ``crf``) and the
low-dim features ``observation.state [3]`` (a smooth random walk) and ``action [3]`` (the next state plus a
gripper feature that closes half way), one task per episode. Images are smooth (a colour gradient with a soft
moving blob, varied per camera), so codec error stays small. It returns the ground truth: per episode the frames
per camera (uint8 ``[L, size, size, 3]``), ``state``, ``action`` (float32), ``timestamp`` and the task.

Layouts follow LeRobot's ``meta/info.json`` path templates: v2.0 / v2.1 write one parquet / mp4 per episode and
``meta/episodes.jsonl`` + ``meta/tasks.jsonl``; v3.0 concatenates ``episodes_per_file`` episodes per parquet / mp4
file and writes ``meta/episodes/chunk-000/file-000.parquet`` (with ``videos/<key>/from_timestamp``) and
``meta/tasks.parquet`` (task strings as the pandas index column, as LeRobot writes it).

``image_storage="image"`` (v2.1) stores the cameras as PNG cells of the parquet (LeRobot's ``dtype: image``)
instead of videos. Faults for error tests: ``nan_action=(episode, row)`` puts a NaN in an action;
``short_video=(episode, camera, frames)`` writes only that many frames of one episode's video (v2.1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

TASKS = ("pick up the red cube", "open the drawer", "push the block left")
CAMERAS = ("observation.images.top", "observation.images.wrist")


def _frames(rng: np.random.Generator, length: int, size: int, cam: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    base = np.stack([0.2 + 0.5 * xx, 0.3 + 0.4 * yy, 0.6 - 0.3 * xx * (1 + cam)], -1)
    start, velocity = rng.uniform(0.25, 0.75, 2), rng.uniform(-0.03, 0.03, 2)
    colour = rng.uniform(0.3, 1.0, 3)
    out = []
    for t in range(length):
        cx, cy = np.clip(start + velocity * t, 0.1, 0.9)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.12**2))[..., None]
        out.append(np.clip(255 * (base * (1 - blob) + colour * blob), 0, 255).round().astype(np.uint8))
    return np.stack(out)


def write_video(path: str, frames: np.ndarray, fps: float, *, crf: int = 12, codec: str = "libx264") -> None:
    """Encode ``frames [n, H, W, 3]`` uint8 as an mp4 (yuv420p) with PyAV."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "g": "2", "bf": "0"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _table(rows: dict[str, Any]) -> Any:
    import pyarrow as pa

    cols = {}
    for name, value in rows.items():
        if isinstance(value, list):  # image cells {"bytes", "path"}
            cols[name] = pa.array(value, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            continue
        arr = np.asarray(value)
        if arr.ndim == 2:
            cols[name] = pa.array(list(arr), type=pa.list_(pa.from_numpy_dtype(arr.dtype)))
        else:
            cols[name] = pa.array(arr)
    return pa.table(cols)


def _features(cameras: Sequence[str], size: int, fps: float, storage: str) -> dict[str, Any]:
    feats: dict[str, Any] = {}
    for cam in cameras:
        feats[cam] = {
            "dtype": storage,
            "shape": [size, size, 3],
            "names": ["height", "width", "channels"],
            "info": {"video.fps": fps, "video.codec": "h264", "video.pix_fmt": "yuv420p"},
        }
    feats["observation.state"] = {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]}
    feats["action"] = {"dtype": "float32", "shape": [3], "names": ["x", "y", "gripper"]}
    for name, dtype in (
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ):
        feats[name] = {"dtype": dtype, "shape": [1], "names": None}
    return feats


def write_tiny_lerobot(
    root: str,
    *,
    version: str = "v3.0",
    num_episodes: int = 4,
    lengths: Sequence[int] | None = None,
    cameras: Sequence[str] = CAMERAS,
    size: int = 32,
    fps: float = 10.0,
    seed: int = 0,
    crf: int = 12,
    episodes_per_file: int = 2,
    nan_action: tuple[int, int] | None = None,
    short_video: tuple[int, str, int] | None = None,
    image_storage: str = "video",
) -> dict[int, dict[str, Any]]:
    """Write the dataset under ``root`` (see the module docstring); returns ``{episode: ground truth}``."""
    import pyarrow.parquet as pq

    if version not in ("v2.0", "v2.1", "v3.0"):
        raise ValueError(f"version must be 'v2.0', 'v2.1' or 'v3.0', got {version!r}")
    if image_storage not in ("video", "image") or (image_storage == "image" and version == "v3.0"):
        raise ValueError(f"image_storage must be 'video', or 'image' with v2.x; got {image_storage!r} ({version})")
    rng = np.random.default_rng(seed)
    lengths = list(lengths) if lengths is not None else [int(rng.integers(9, 13)) for _ in range(num_episodes)]
    truth: dict[int, dict[str, Any]] = {}
    index = 0
    for e, length in enumerate(lengths):
        state = np.cumsum(rng.normal(0, 0.05, (length + 1, 3)), 0).astype(np.float32)
        gripper = (np.arange(length) >= length // 2)[:, None]  # closes half way
        action = np.concatenate([state[1:, :2], gripper], 1).astype(np.float32)
        if nan_action is not None and nan_action[0] == e:
            action[nan_action[1], 0] = np.nan
        task_index = e % len(TASKS)
        truth[e] = {
            "state": state[:length],
            "action": action,
            "timestamp": (np.arange(length) / fps).astype(np.float32),
            "frame_index": np.arange(length),
            "index": index + np.arange(length),
            "task_index": task_index,
            "task": TASKS[task_index],
            "frames": {cam: _frames(rng, length, size, c) for c, cam in enumerate(cameras)},
        }
        index += length

    def rows(e: int) -> dict[str, Any]:
        t = truth[e]
        n = len(t["action"])
        images = {}
        if image_storage == "image":
            images = {cam: [{"bytes": _png(img), "path": None} for img in t["frames"][cam]] for cam in cameras}
        return {
            **images,
            "observation.state": t["state"],
            "action": t["action"],
            "timestamp": t["timestamp"],
            "frame_index": t["frame_index"].astype(np.int64),
            "episode_index": np.full(n, e, np.int64),
            "index": t["index"].astype(np.int64),
            "task_index": np.full(n, t["task_index"], np.int64),
        }

    meta = os.path.join(root, "meta")
    os.makedirs(meta, exist_ok=True)
    info = {
        "codebase_version": version,
        "robot_type": "tiny_arm",
        "total_episodes": len(lengths),
        "total_frames": int(sum(lengths)),
        "total_tasks": len(TASKS),
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(lengths)}"},
        "features": _features(cameras, size, fps, image_storage),
    }
    if version in ("v2.0", "v2.1"):
        info["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        info["video_path"] = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        info["total_chunks"], info["total_videos"] = 1, len(lengths) * len(cameras)
        for e in truth:
            path = os.path.join(root, info["data_path"].format(episode_chunk=0, episode_index=e))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(_table(rows(e)), path)
            for cam in cameras if image_storage == "video" else ():
                frames = truth[e]["frames"][cam]
                if short_video is not None and short_video[:2] == (e, cam):
                    frames = frames[: short_video[2]]
                video = info["video_path"].format(episode_chunk=0, video_key=cam, episode_index=e)
                write_video(os.path.join(root, video), frames, fps, crf=crf)
        with open(os.path.join(meta, "episodes.jsonl"), "w") as f:
            for e, t in truth.items():
                f.write(json.dumps({"episode_index": e, "tasks": [t["task"]], "length": len(t["action"])}) + "\n")
        with open(os.path.join(meta, "tasks.jsonl"), "w") as f:
            for i, task in enumerate(TASKS):
                f.write(json.dumps({"task_index": i, "task": task}) + "\n")
    else:
        import pyarrow as pa

        info["data_path"] = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        info["data_files_size_in_mb"], info["video_files_size_in_mb"] = 100, 200
        ep_rows: list[dict[str, Any]] = []
        episodes = sorted(truth)
        for file_index, start in enumerate(range(0, len(episodes), episodes_per_file)):
            group = episodes[start : start + episodes_per_file]
            tables = [_table(rows(e)) for e in group]
            path = os.path.join(root, info["data_path"].format(chunk_index=0, file_index=file_index))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(pa.concat_tables(tables), path)
            offset = 0.0
            from_index = int(truth[group[0]]["index"][0])
            for e in group:
                n = len(truth[e]["action"])
                row = {
                    "episode_index": e,
                    "tasks": [truth[e]["task"]],
                    "length": n,
                    "data/chunk_index": 0,
                    "data/file_index": file_index,
                    "dataset_from_index": from_index,
                    "dataset_to_index": from_index + n,
                    "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0,
                }
                for cam in cameras:
                    row[f"videos/{cam}/chunk_index"] = 0
                    row[f"videos/{cam}/file_index"] = file_index
                    row[f"videos/{cam}/from_timestamp"] = offset
                    row[f"videos/{cam}/to_timestamp"] = offset + n / fps
                offset += n / fps
                from_index += n
                ep_rows.append(row)
            for cam in cameras:
                frames = np.concatenate([truth[e]["frames"][cam] for e in group])
                video = info["video_path"].format(video_key=cam, chunk_index=0, file_index=file_index)
                write_video(os.path.join(root, video), frames, fps, crf=crf)
        path = os.path.join(meta, "episodes", "chunk-000", "file-000.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(ep_rows), path)
        tasks = pa.table({"task_index": pa.array(range(len(TASKS)), pa.int64()), "__index_level_0__": list(TASKS)})
        pq.write_table(tasks, os.path.join(meta, "tasks.parquet"))
    with open(os.path.join(meta, "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    return truth
