"""LeRobot dataset -> the original's robotics shards (``launch.convert_lerobot``), resumable and parallel.

Output (``output_dir``)::

    train/shard-000000.tar ...   samples <key>.<camera>_t<idx>.jpg|png, <key>.lowdim.npz, <key>.metadata.json,
                                 <key>.language_instructions.json (``data.robotics`` reads them; so does the original)
    train/shard-000000.json      per-shard record (written after its tar; a tar without it is redone)
    train/stats.json + stats_sketch.npz, preprocessing_config.yaml, processing_metadata.json, manifest.jsonl
    val/...                      the same for the validation episodes (when ``val_fraction > 0``)
    conversion_plan.json         the options and the episode -> shard plan (written first)
    conversion_complete.json     written last: the conversion is finished

**Episodes and splits.** Episodes (all, minus ``skip_episodes``, at most ``max_episodes``) are split into train /
val by a seeded permutation (``val_fraction`` of them, at least one when the fraction is positive and there are
two or more episodes, never all) and grouped, in order, into shards of about ``samples_per_shard`` samples
(whole episodes). Shards are converted in parallel (``num_workers`` processes, each decoding its episodes'
videos) with a tqdm bar over source frames.

**Resuming.** Each shard is written to ``<name>.tar.tmp-<pid>``, renamed to ``<name>.tar``, then its record
``<name>.json`` is written the same way; a rerun with the same options converts only the shards without a record
(and removes stale temp files). ``manifest.jsonl`` of a split is written only after all its shards, statistics and
configs, and ``conversion_complete.json`` after everything: a partial output has no manifest (readers fail naming
it) and is never taken for a finished one. A rerun with other options on the same ``output_dir`` is refused
(``overwrite=True`` starts again).

**Samples** (the original's LeRobot converter and preprocessing options): one per anchor frame ``t`` (every
``stride``-th frame); low-dim windows rows ``t - past_lowdim_steps .. t + future_lowdim_steps``, padded outside the
episode by ``padding_strategy`` (``copy``: edge rows; ``zero``) with ``past_mask`` / ``future_mask`` marking real
rows (the current step counts as future); anchors needing more than ``max_padding_left`` / ``max_padding_right``
padded rows are dropped. Images at ``t + i`` for ``i`` in ``image_indices`` (clipped to the episode), one per camera,
optionally centre-cropped / resized to ``resize_images_size`` and encoded as JPEG (``jpeg_quality``) or PNG.

Options:

* ``fps``: resample the episodes to this frame rate (the frame nearest each ``k / fps``; at most the dataset's);
* ``relative_actions``: entries ``"ACTION:STATE"`` or ``"ACTION:STATE:DIMS"`` (``DIMS`` like ``0-5`` or ``0,1,2``)
  add a field ``ACTION_relative``: the action window minus the state at the anchor frame (on ``DIMS`` only; other
  features stay absolute; the shapes must agree). Train on it with ``robotics.action_fields = ['ACTION_relative']``;
* ``filter_still_samples`` / ``still_threshold``: drop an anchor when every action and proprioception field has a
  per-feature standard deviation ``<= still_threshold`` over the window's real rows (the original's test, on the
  named fields instead of its name patterns).

Bad input raises :class:`~vla_foundry_jax.data.lerobot.LeRobotError` naming the episode / field and the fix: a camera
or field absent from the dataset, a zero-length episode, a video shorter than its parquet timestamps, NaN in a
low-dim field, an unknown LeRobot version.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax.data.lerobot import LeRobotDataset, LeRobotError, decode_image_bytes, resolve_lerobot_source
from vla_foundry_jax.data.shards import npz_bytes
from vla_foundry_jax.data.stats import accumulate_shards, save_stats

PLAN_FILE = "conversion_plan.json"
COMPLETE_FILE = "conversion_complete.json"


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What ``launch.convert_lerobot`` takes (see the module docstring). ``cameras`` None: every camera;
    ``action_fields`` / ``proprioception_fields`` None: ``["action"]`` / ``["observation.state"]`` when present."""

    source: str
    output_dir: str
    cameras: tuple[str, ...] | None = None
    action_fields: tuple[str, ...] | None = None
    proprioception_fields: tuple[str, ...] | None = None
    extra_fields: tuple[str, ...] = ()
    fps: float | None = None
    past_lowdim_steps: int = 1
    future_lowdim_steps: int = 14
    image_indices: tuple[int, ...] = (-1, 0)
    stride: int = 1
    max_padding_left: int = 1
    max_padding_right: int = 7
    padding_strategy: str = "copy"
    filter_still_samples: bool = False
    still_threshold: float = 0.01
    relative_actions: tuple[str, ...] = ()
    val_fraction: float = 0.1
    split_seed: int = 0
    samples_per_shard: int = 128
    resize_images_size: tuple[int, int] | None = None
    image_resizing_method: str = "center_crop"
    image_format: str = "jpg"
    jpeg_quality: int = 95
    max_episodes: int = -1
    skip_episodes: tuple[int, ...] = ()
    compute_statistics: bool = True
    revision: str | None = None
    cache_dir: str | None = None
    num_workers: int = 1
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        def bad(msg: str) -> LeRobotError:
            return LeRobotError(msg)

        if self.past_lowdim_steps < 0 or self.future_lowdim_steps < 0:
            raise bad("--past_lowdim_steps and --future_lowdim_steps must be >= 0.")
        if self.stride < 1 or self.samples_per_shard < 1:
            raise bad("--stride and --samples_per_shard must be >= 1.")
        if self.padding_strategy not in ("copy", "zero"):
            raise bad(f"--padding_strategy={self.padding_strategy!r}: use 'copy' or 'zero'.")
        if self.image_format not in ("jpg", "png"):
            raise bad(f"--image_format={self.image_format!r}: use 'jpg' or 'png'.")
        if self.image_resizing_method not in ("center_crop", "resize"):
            raise bad(f"--image_resizing_method={self.image_resizing_method!r}: use 'center_crop' or 'resize'.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad(f"--val_fraction={self.val_fraction}: must be in [0, 1).")
        if self.fps is not None and self.fps <= 0:
            raise bad(f"--fps={self.fps}: must be positive.")
        if not self.image_indices:
            raise bad("--image_indices is empty: the policy needs at least the current image (0).")
        for spec in self.relative_actions:
            parse_relative(spec)

    def fingerprint_fields(self) -> dict[str, Any]:
        skip = {"num_workers", "overwrite", "progress", "cache_dir", "output_dir"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def parse_relative(spec: str) -> tuple[str, str, list[int] | None]:
    """``"ACTION:STATE[:DIMS]"`` -> ``(action, state, dims or None)``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise LeRobotError(f"--relative_actions entry {spec!r}: expected ACTION:STATE or ACTION:STATE:DIMS.")
    dims = None
    if len(parts) == 3:
        try:
            dims = []
            for piece in parts[2].split(","):
                lo, _, hi = piece.partition("-")
                dims.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise LeRobotError(f"--relative_actions entry {spec!r}: DIMS must look like 0-5 or 0,1,2.") from None
    return parts[0], parts[1], dims


# ---------------------------------------------------------------- planning


def _resolved_fields(ds: LeRobotDataset, opts: ConvertOptions) -> dict[str, list[str]]:
    def default(name: str) -> list[str]:
        return [name] if name in ds.lowdim_fields else []

    actions = list(opts.action_fields) if opts.action_fields is not None else default("action")
    proprio = (
        list(opts.proprioception_fields) if opts.proprioception_fields is not None else default("observation.state")
    )
    if not actions:
        raise LeRobotError(
            f"no action field: the dataset has no 'action' feature; name one with --action_fields (numeric fields: "
            f"{ds.lowdim_fields})."
        )
    cameras = list(opts.cameras) if opts.cameras is not None else list(ds.cameras)
    if not cameras:
        raise LeRobotError(f"the dataset {ds.root} has no camera (video / image) features; the policy needs images.")
    ds.check_fields(cameras, [], flag="--cameras")
    ds.check_fields([], actions, flag="--action_fields")
    ds.check_fields([], proprio, flag="--proprioception_fields")
    ds.check_fields([], list(opts.extra_fields), flag="--extra_fields")
    rel_sources = []
    for spec in opts.relative_actions:
        a, s, dims = parse_relative(spec)
        ds.check_fields([], [a, s], flag="--relative_actions")
        da, dst = ds.feature_dim(a), ds.feature_dim(s)
        use = dims if dims is not None else list(range(da))
        if (dims is None and da != dst) or any(d < 0 or d >= min(da, dst) for d in use):
            raise LeRobotError(
                f"--relative_actions entry {spec!r}: {a!r} has {da} features and {s!r} {dst}; give the dims to make "
                f"relative (ACTION:STATE:DIMS, each < {min(da, dst)})."
            )
        rel_sources += [a, s]
    stored = list(dict.fromkeys([*actions, *proprio, *opts.extra_fields]))
    read = list(dict.fromkeys([*stored, *rel_sources]))
    return {"actions": actions, "proprio": proprio, "cameras": cameras, "stored": stored, "read": read}


def _split_episodes(episodes: list[int], frac: float, seed: int) -> dict[str, list[int]]:
    n = len(episodes)
    n_val = round(frac * n)
    if frac > 0 and n_val == 0 and n >= 2:
        n_val = 1
    n_val = min(n_val, max(n - 1, 0))  # keep at least one training episode
    perm = np.random.default_rng(seed).permutation(n)
    val = {episodes[i] for i in perm[:n_val]}
    return {"train": [e for e in episodes if e not in val], "val": sorted(val)}


def make_plan(ds: LeRobotDataset, opts: ConvertOptions) -> dict[str, Any]:
    """The episode -> shard plan (deterministic from the dataset's metadata and the options)."""
    skip = set(opts.skip_episodes)
    episodes = [e for e in ds.episodes if e not in skip]
    if opts.max_episodes >= 0:
        episodes = episodes[: opts.max_episodes]
    if not episodes:
        raise LeRobotError(f"no episodes to convert in {ds.root} (after --skip_episodes / --max_episodes).")
    for e in episodes:
        if ds.episodes[e].length == 0:
            raise LeRobotError(
                f"episode {e} has zero length in the dataset's episode metadata; remove it from the dataset or pass "
                f"--skip_episodes={e}."
            )
    ratio = 1.0 if not opts.fps or not ds.fps else min(1.0, opts.fps / ds.fps)
    shards = []
    for split, eps in _split_episodes(episodes, opts.val_fraction, opts.split_seed).items():
        group, est = [], 0.0
        for e in eps:
            group.append(e)
            est += max(ds.episodes[e].length, 1) * ratio / opts.stride
            if est >= opts.samples_per_shard:
                shards.append({"split": split, "episodes": group})
                group, est = [], 0.0
        if group:
            shards.append({"split": split, "episodes": group})
    counters: dict[str, int] = {}
    for s in shards:
        s["name"] = f"shard-{counters.get(s['split'], 0):06d}"
        counters[s["split"]] = counters.get(s["split"], 0) + 1
    return {"shards": shards}


# ---------------------------------------------------------------- one shard


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_jsonable).encode("utf-8")


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


class _ImageEncoder:
    def __init__(self, opts: ConvertOptions) -> None:
        self.size = tuple(opts.resize_images_size) if opts.resize_images_size else None
        self.method = opts.image_resizing_method
        self.format = opts.image_format
        self.quality = opts.jpeg_quality

    def __call__(self, rgb: np.ndarray) -> bytes:
        from PIL import Image

        im = Image.fromarray(np.ascontiguousarray(rgb, np.uint8))
        if self.size is not None and (im.height, im.width) != self.size:
            h, w = self.size
            if self.method == "center_crop":
                scale = max(w / im.width, h / im.height)
                cw, ch = min(im.width, round(w / scale)), min(im.height, round(h / scale))
                left, top = (im.width - cw) // 2, (im.height - ch) // 2
                im = im.crop((left, top, left + cw, top + ch))
            im = im.resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        if self.format == "jpg":
            im.save(buf, format="JPEG", quality=self.quality)
        else:
            im.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def _select_rows(ts: np.ndarray, fps: float | None, native: float | None, where: str) -> np.ndarray:
    """Row indices of the frames kept at ``fps`` (all rows when ``fps`` is None or the native rate)."""
    if fps is None or (native and abs(fps - native) < 1e-9):
        return np.arange(len(ts))
    if native and fps > native + 1e-9:
        raise LeRobotError(f"--fps={fps} exceeds the dataset's {native} frames per second; lower --fps.")
    t0 = ts[0]
    targets = t0 + np.arange(0.0, ts[-1] - t0 + 1e-9, 1.0 / fps)
    rows = np.clip(np.searchsorted(ts, targets), 0, len(ts) - 1)
    prev = np.clip(rows - 1, 0, len(ts) - 1)
    rows = np.where(np.abs(ts[prev] - targets) <= np.abs(ts[rows] - targets), prev, rows)
    return np.unique(rows)


def _is_still(fields: dict[str, np.ndarray], names: Sequence[str], lo: int, hi: int, threshold: float) -> bool:
    for name in names:
        seg = fields[name][lo : hi + 1]
        if len(seg) > 1 and float(np.std(seg, axis=0).max()) > threshold:
            return False
    return True


def convert_episode(
    ds: LeRobotDataset, episode: int, opts: ConvertOptions, fields: dict[str, list[str]]
) -> tuple[list[dict[str, bytes]], dict[str, int]]:
    """The samples of one episode (``{"__key__": key, member: bytes}``) and counters."""
    where = f"episode {episode}"
    image_cams = [c for c in fields["cameras"] if ds.features[c].get("dtype") == "image"]
    raw = ds.read_episode(episode, fields["read"], image_cams)
    if raw["num_rows"] == 0:
        raise LeRobotError(
            f"{where} has zero length (no rows in {ds.episodes[episode].data_file}); remove it from the dataset or "
            f"pass --skip_episodes={episode}."
        )
    for name in fields["read"]:
        arr = raw[name]
        if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
            row = int(np.argwhere(np.isnan(arr))[0][0])
            frame = int(raw["frame_index"][row]) if "frame_index" in raw else row
            raise LeRobotError(
                f"{where}, field {name!r}: NaN at frame {frame}; clean the data (or drop the episode with "
                f"--skip_episodes={episode})."
            )
    rows = _select_rows(np.asarray(raw["timestamp"], np.float64), opts.fps, ds.fps, where)
    L = len(rows)
    lowdim = {name: np.asarray(raw[name])[rows] for name in fields["read"]}
    task_of_row = None
    if "task_index" in raw and ds.tasks:
        task_of_row = [ds.tasks.get(int(i)) for i in np.asarray(raw["task_index"])[rows]]
    ep_tasks = list(ds.episodes[episode].tasks)

    past, future = opts.past_lowdim_steps, opts.future_lowdim_steps
    anchors, counts = [], {"filtered_padding": 0, "filtered_still": 0, "potential": 0}
    movement = [*fields["actions"], *fields["proprio"]]
    for t in range(0, L, opts.stride):
        counts["potential"] += 1
        start, end = t - past, t + future
        pad_l, pad_r = max(0, -start), max(0, end - (L - 1))
        if pad_l > opts.max_padding_left or pad_r > opts.max_padding_right:
            counts["filtered_padding"] += 1
            continue
        if opts.filter_still_samples and _is_still(
            lowdim, movement, max(0, start), min(L - 1, end), opts.still_threshold
        ):
            counts["filtered_still"] += 1
            continue
        anchors.append(t)

    image_offsets = [int(i) for i in opts.image_indices]
    needed = sorted({int(np.clip(t + i, 0, L - 1)) for t in anchors for i in image_offsets})
    encode = _ImageEncoder(opts)
    images: dict[str, dict[int, bytes]] = {}
    ts = np.asarray(raw["timestamp"], np.float64)[rows]
    for cam in fields["cameras"]:
        if cam in image_cams:
            cells = raw[cam]
            images[cam] = {
                r: encode(decode_image_bytes(cells[rows[r]], f"{where}, camera {cam!r}, row {rows[r]}")) for r in needed
            }
        else:
            frames = ds.decode_video(episode, cam, ts[needed], transform=encode)
            images[cam] = dict(zip(needed, frames, strict=True))

    ext = opts.image_format
    rel_specs = [parse_relative(s) for s in opts.relative_actions]
    samples = []
    for t in anchors:
        idx = np.arange(t - past, t + future + 1)
        inside = (idx >= 0) & (idx < L)
        clipped = np.clip(idx, 0, L - 1)
        steps = np.arange(past + 1 + future)
        past_mask, future_mask = inside & (steps < past), inside & (steps >= past)
        arrays: dict[str, np.ndarray] = {}
        for name in fields["stored"]:
            w = lowdim[name][clipped]
            if opts.padding_strategy == "zero":
                w = np.where(inside[:, None], w, 0)
            arrays[name] = w
        for a, s, dims in rel_specs:
            w = lowdim[a][clipped].astype(np.result_type(lowdim[a].dtype, lowdim[s].dtype), copy=True)
            use = dims if dims is not None else list(range(w.shape[1]))
            w[:, use] -= lowdim[s][t, use]
            if opts.padding_strategy == "zero":
                w = np.where(inside[:, None], w, 0)
            arrays[f"{a}_relative"] = w
        arrays["past_mask"], arrays["future_mask"] = past_mask, future_mask
        key = f"ep{episode:06d}_t{t:06d}"
        sample: dict[str, Any] = {"__key__": key}
        image_timesteps = []
        for i in image_offsets:
            r = int(np.clip(t + i, 0, L - 1))
            image_timesteps.append(r)
            for cam in fields["cameras"]:
                sample[f"{cam}_t{i}.{ext}"] = images[cam][r]
        task = (task_of_row[t] if task_of_row else None) or (ep_tasks[0] if ep_tasks else "")
        row = int(rows[t])
        meta = {
            "episode_id": f"episode_{episode}",
            "episode_index": episode,
            "sample_id": key,
            "anchor_timestep": t,
            "anchor_relative_idx": past,
            "camera_names": list(fields["cameras"]),
            "image_timesteps": image_timesteps,
            "lowdim_start_timestep": t - past,
            "lowdim_end_timestep": t + future,
            "past_padding": max(0, past - t),
            "future_padding": max(0, t + future - (L - 1)),
            "original_episode_length": L,
            "is_padded": bool(not inside.all()),
            "source_row": row,
            "timestamp": float(raw["timestamp"][row]),
        }
        for c in ("frame_index", "task_index"):
            if c in raw:
                meta[c] = int(raw[c][row])
        sample["lowdim.npz"] = npz_bytes(arrays)
        sample["metadata.json"] = _json_bytes(meta)
        sample["language_instructions.json"] = _json_bytes({"original": [task] if task else []})
        samples.append(sample)
    counts["samples"] = len(samples)
    counts["frames"] = L
    return samples, counts


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_tar(path: str, samples: list[dict[str, Any]]) -> int:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for field, data in sample.items():
                    if field == "__key__":
                        continue
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return os.path.getsize(path)


_WORKER_DATASET: dict[tuple[str, str], LeRobotDataset] = {}  # one per worker process and conversion


def _worker_dataset(root: str, fingerprint: str) -> LeRobotDataset:
    if (root, fingerprint) not in _WORKER_DATASET:
        _WORKER_DATASET.clear()
        _WORKER_DATASET[(root, fingerprint)] = LeRobotDataset(root)
    return _WORKER_DATASET[(root, fingerprint)]


def convert_shard(job: dict[str, Any], ds: LeRobotDataset | None = None) -> dict[str, Any]:
    """Convert one planned shard (its episodes) and write ``<split>/<name>.tar`` then ``<name>.json``."""
    start = time.perf_counter()
    opts = ConvertOptions(**job["options"])
    ds = ds if ds is not None else _worker_dataset(job["root"], job["fingerprint"])
    fields = job["fields"]
    samples, totals = [], {"samples": 0, "frames": 0, "filtered_padding": 0, "filtered_still": 0, "potential": 0}
    for e in job["episodes"]:
        s, c = convert_episode(ds, e, opts, fields)
        samples += s
        for k in totals:
            totals[k] += c[k]
    directory = os.path.join(opts.output_dir, job["split"])
    os.makedirs(directory, exist_ok=True)
    size = _write_tar(os.path.join(directory, job["name"] + ".tar"), samples)
    record = {
        "shard": job["name"],
        "split": job["split"],
        "episodes": job["episodes"],
        "bytes": size,
        "fingerprint": job["fingerprint"],
        "seconds": round(time.perf_counter() - start, 4),
        **totals,
    }
    _write_atomic(os.path.join(directory, job["name"] + ".json"), json.dumps(record, indent=1).encode())
    return record


def _finished(directory: str, name: str, fingerprint: str) -> dict[str, Any] | None:
    rec_path, tar_path = os.path.join(directory, name + ".json"), os.path.join(directory, name + ".tar")
    if not (os.path.isfile(rec_path) and os.path.isfile(tar_path)):
        return None
    try:
        with open(rec_path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != fingerprint or rec.get("bytes") != os.path.getsize(tar_path):
        return None
    return rec


# ---------------------------------------------------------------- the whole conversion


def _fingerprint(opts: ConvertOptions, ds: LeRobotDataset) -> str:
    with open(os.path.join(ds.root, "meta", "info.json"), "rb") as f:
        info_hash = hashlib.sha256(f.read()).hexdigest()
    blob = json.dumps({"options": opts.fingerprint_fields(), "info": info_hash}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _prepare_output(opts: ConvertOptions, fingerprint: str) -> dict[str, Any] | None:
    """Check ``output_dir`` against this conversion; returns the completion record when it is already done."""
    out = opts.output_dir
    plan_path, done_path = os.path.join(out, PLAN_FILE), os.path.join(out, COMPLETE_FILE)
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    if not os.path.isfile(plan_path):
        raise LeRobotError(
            f"--output_dir={out!r} is not empty and holds no {PLAN_FILE} (not a conversion output); choose an empty "
            "or new directory."
        )
    with open(plan_path, encoding="utf-8") as f:
        old = json.load(f)
    if opts.overwrite:
        _remove_output(out, old)
        return None
    if old.get("fingerprint") != fingerprint:
        diff = {
            k: (old.get("options", {}).get(k), v)
            for k, v in json.loads(json.dumps(opts.fingerprint_fields(), default=list)).items()
            if old.get("options", {}).get(k) != v
        }
        raise LeRobotError(
            f"--output_dir={out!r} holds a conversion with other options or source data "
            f"(changed: {diff or 'the source meta/info.json'}); use a new --output_dir, or --overwrite to start "
            "again."
        )
    if os.path.isfile(done_path):
        with open(done_path, encoding="utf-8") as f:
            return json.load(f)
    return None


def _remove_output(out: str, plan: dict[str, Any]) -> None:
    for name in (COMPLETE_FILE, PLAN_FILE):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for split in {s["split"] for s in plan.get("shards", [])}:
        directory = os.path.join(out, split)
        if not os.path.isdir(directory):
            continue
        for f in os.listdir(directory):
            if f.startswith("shard-") or f in (
                "manifest.jsonl", "stats.json", "stats_sketch.npz", "preprocessing_config.yaml",
                "processing_metadata.json",
            ):  # fmt: skip
                os.remove(os.path.join(directory, f))


def _preprocessing_config(opts: ConvertOptions, ds: LeRobotDataset, fields: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "type": "lerobot",
        "source_episodes": [opts.source],
        "lerobot_version": ds.version,
        "source_fps": ds.fps,
        "fps": opts.fps or ds.fps,
        "camera_names": list(fields["cameras"]),
        "image_indices": [int(i) for i in opts.image_indices],
        "past_lowdim_steps": opts.past_lowdim_steps,
        "future_lowdim_steps": opts.future_lowdim_steps,
        "stride": opts.stride,
        "max_padding_left": opts.max_padding_left,
        "max_padding_right": opts.max_padding_right,
        "padding_strategy": opts.padding_strategy,
        "filter_still_samples": opts.filter_still_samples,
        "still_threshold": opts.still_threshold,
        "samples_per_shard": opts.samples_per_shard,
        "resize_images_size": list(opts.resize_images_size) if opts.resize_images_size else None,
        "image_resizing_method": opts.image_resizing_method,
        "image_format": opts.image_format,
        "jpeg_quality": opts.jpeg_quality,
        "action_keys": list(fields["actions"]),
        "observation_keys": [f for f in fields["stored"] if f not in fields["actions"]],
        "action_fields": list(fields["actions"]),
        "proprioception_fields": list(fields["proprio"]),
        "relative_actions": list(opts.relative_actions),
        "val_fraction": opts.val_fraction,
        "split_seed": opts.split_seed,
        "compute_statistics": opts.compute_statistics,
    }


def _finish_split(
    opts: ConvertOptions, ds: LeRobotDataset, fields: dict, split: str, records: list[dict], pool_workers: int
) -> dict[str, Any]:
    import yaml

    directory = os.path.join(opts.output_dir, split)
    records = sorted(records, key=lambda r: r["shard"])
    paths = [os.path.join(directory, r["shard"] + ".tar") for r in records if r["samples"] > 0]
    if opts.compute_statistics and paths:
        accs, _ = accumulate_shards(paths, num_workers=pool_workers)
        save_stats(accs, os.path.join(directory, "stats.json"))
    config = _preprocessing_config(opts, ds, fields)
    _write_atomic(os.path.join(directory, "preprocessing_config.yaml"), yaml.safe_dump(config, sort_keys=True).encode())
    summary = {
        "num_episodes": sum(len(r["episodes"]) for r in records),
        "num_samples": sum(r["samples"] for r in records),
        "num_frames": sum(r["frames"] for r in records),
        "num_shards": len(paths),
        "filtered_padding": sum(r["filtered_padding"] for r in records),
        "filtered_still": sum(r["filtered_still"] for r in records),
        "total_potential_samples": sum(r["potential"] for r in records),
    }
    metadata = {
        "metadata_version": "1.0",
        "command_line": {"script_name": "launch/convert_lerobot.py"},
        "arguments": config,
        "split": split,
        "episodes": [e for r in records for e in r["episodes"]],
        **summary,
    }
    _write_atomic(os.path.join(directory, "processing_metadata.json"), json.dumps(metadata, indent=1).encode())
    lines = [json.dumps({"shard": r["shard"], "num_sequences": r["samples"]}) for r in records if r["samples"] > 0]
    _write_atomic(os.path.join(directory, "manifest.jsonl"), ("\n".join(lines) + "\n").encode())
    return {"manifest": os.path.join(directory, "manifest.jsonl"), **summary}


def convert_lerobot(opts: ConvertOptions) -> dict[str, Any]:
    """Convert the LeRobot dataset ``opts.source`` into ``opts.output_dir`` (see the module docstring).

    Returns the completion record: per split its manifest and counts, ``frames_per_second`` (source frames over
    wall time of this call), ``shards_converted`` / ``shards_reused``.
    """
    opts.validate()
    start = time.perf_counter()
    root = resolve_lerobot_source(opts.source, revision=opts.revision, cache_dir=opts.cache_dir)
    ds = LeRobotDataset(root)
    fields = _resolved_fields(ds, opts)
    fingerprint = _fingerprint(opts, ds)
    done = _prepare_output(opts, fingerprint)
    if done is not None:
        return {**done, "already_complete": True}
    plan = make_plan(ds, opts)
    os.makedirs(opts.output_dir, exist_ok=True)
    plan_doc = {
        "fingerprint": fingerprint,
        "source_root": root,
        "options": json.loads(json.dumps(opts.fingerprint_fields(), default=list)),
        **plan,
    }
    _write_atomic(os.path.join(opts.output_dir, PLAN_FILE), json.dumps(plan_doc, indent=1).encode())
    opts_dict = dataclasses.asdict(opts)
    records: dict[str, list[dict]] = {}
    jobs = []
    for shard in plan["shards"]:
        directory = os.path.join(opts.output_dir, shard["split"])
        os.makedirs(directory, exist_ok=True)
        for f in os.listdir(directory):  # temp files of a killed run
            if ".tmp-" in f:
                os.remove(os.path.join(directory, f))
        rec = _finished(directory, shard["name"], fingerprint)
        if rec is not None:
            records.setdefault(shard["split"], []).append(rec)
        else:
            jobs.append({**shard, "root": root, "options": opts_dict, "fields": fields, "fingerprint": fingerprint})
    reused = sum(len(v) for v in records.values())
    bar = None
    if opts.progress:
        from tqdm import tqdm

        total = sum(ds.episodes[e].length for j in jobs for e in j["episodes"])
        bar = tqdm(total=total, unit="frame", desc="convert_lerobot")
    workers = max(1, int(opts.num_workers))

    converted_frames = 0

    def add(rec: dict[str, Any]) -> None:
        nonlocal converted_frames
        records.setdefault(rec["split"], []).append(rec)
        converted_frames += rec["frames"]
        if bar is not None:
            bar.update(sum(ds.episodes[e].length for e in rec["episodes"]))

    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            add(convert_shard(job, ds))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(convert_shard, job) for job in jobs]
            try:
                for fut in concurrent.futures.as_completed(futures):
                    add(fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    if bar is not None:
        bar.close()
    convert_seconds = time.perf_counter() - start
    splits = {split: _finish_split(opts, ds, fields, split, recs, workers) for split, recs in sorted(records.items())}
    elapsed = time.perf_counter() - start
    result = {
        "output_dir": opts.output_dir,
        "source_root": root,
        "lerobot_version": ds.version,
        "fingerprint": fingerprint,
        "splits": splits,
        "cameras": fields["cameras"],
        "action_fields": fields["actions"],
        "proprioception_fields": fields["proprio"],
        "shards_converted": len(jobs),
        "shards_reused": reused,
        "num_frames": sum(split["num_frames"] for split in splits.values()),
        "frames_converted": converted_frames,
        "seconds": round(elapsed, 3),
        "convert_seconds": round(convert_seconds, 3),
        "frames_per_second": round(converted_frames / convert_seconds, 2) if converted_frames else None,
        "num_workers": workers,
    }
    _write_atomic(os.path.join(opts.output_dir, COMPLETE_FILE), json.dumps(result, indent=1).encode())
    return result
