"""The tiny "reach" robotics task: a generated dataset in the original's robotics layout and a matching env.

A point agent in ``[-1, 1]^2`` must reach a coloured disc. One camera, ``scene``, sees a 32x32 image rendered from
the state (:func:`render`): dark background, the target disc (radius 3.5 px, anti-aliased, in its colour: red,
green, blue or yellow) and the agent as a white 3x3 px square (anti-aliased, drawn on top); image x grows with
x, image rows grow with -y. The instruction is ``"move to the <colour> target"`` (``original``; paraphrases under
``randomized``). Optional distractor discs of other colours make the instruction necessary (default: none).

Episodes (:func:`make_episode`): agent start uniform in ``[-0.85, 0.85]^2``, target uniform in ``[-0.8, 0.8]^2``
(redrawn when closer than 0.2 or more than 13 expert steps away), length ``L`` uniform in 12..16 (at least the
steps needed + 2). The expert commands the next position: ``a_k = s_k + clip(target - s_k, max norm 0.15)``
(so it lands exactly on the target and stays); ``s_{k+1} = a_k``. Lowdim fields per timestep ``k < L``:
``agent_xy = s_k`` (proprioception, 2) and ``action_xy = a_k`` (action, 2).

Samples: ``samples_per_episode`` anchors ``t`` per episode (distinct, uniform; default 1, so the 544 training
samples come from 544 episodes: target positions vary most); window past 1 / future 7
(``T_window = 9``, rows ``t - 1 .. t + 7``), copy-padded outside the episode with ``past_mask`` / ``future_mask``
False there (``past_mask`` True only at row 0, ``future_mask`` at rows 1..8: the current step counts as future,
as in the original's LBM data); image index 0 only (``scene_t0.png``, the state at ``t``). Members per sample:
``<key>.scene_t0.png`` (PNG, lossless, so the env renders exactly what the dataset holds; the original's reader
filters on ``.jpg``, ours takes png too), ``<key>.lowdim.npz`` (float64 fields + masks), ``<key>.metadata.json``,
``<key>.language_instructions.json``. Beside the manifest: ``stats.json`` (the original's layout, exact numpy
statistics instead of t-digests), ``preprocessing_config.yaml`` and ``processing_metadata.json``.

Size: a tar member costs a 512-byte header plus its data rounded up to 512 bytes, so a sample takes ~4.6 KB
whatever its content; the bundled ``tiny_data/reach`` (544 train + 64 validation samples) stays under 3 MB.
``python -m launch.make_tiny_datasets --only_robotics --reach_train_samples=N`` writes larger sets.

:class:`ReachEnv` steps the same dynamics (command clipped to 0.15 from the current position and to the square),
renders with the same function, and reports success within 0.1 of the target.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any

import numpy as np

from vla_foundry_jax.data.shards import npz_bytes, write_shards

CAMERA = "scene"
IMAGE_SIZE = 32
COLOURS = {"red": (230, 45, 45), "green": (45, 200, 70), "blue": (60, 110, 255), "yellow": (240, 215, 40)}
BACKGROUND = (20, 20, 28)
AGENT_COLOUR = (255, 255, 255)
TARGET_RADIUS_PX = 3.5
AGENT_HALF_PX = 1.5
MAX_STEP = 0.15
SUCCESS_RADIUS = 0.1
PAST, FUTURE = 1, 7
ACTION_FIELD, PROPRIO_FIELD = "action_xy", "agent_xy"
EPISODE_LENGTHS = (12, 16)


def instruction(colour: str) -> str:
    return f"move to the {colour} target"


def instructions(colour: str) -> dict[str, list[str]]:
    """The sample's ``language_instructions.json``."""
    return {
        "original": [instruction(colour)],
        "randomized": [f"go to the {colour} target", f"reach the {colour} target"],
    }


def to_pixels(xy: np.ndarray, size: int = IMAGE_SIZE) -> tuple[float, float]:
    """World ``(x, y)`` -> pixel ``(col, row)`` (pixel centres at integers; the square maps onto [0, size - 1])."""
    return (float(xy[0]) + 1.0) * 0.5 * (size - 1), (1.0 - float(xy[1])) * 0.5 * (size - 1)


def render(
    agent_xy: np.ndarray,
    target_xy: np.ndarray,
    colour: str,
    *,
    distractors: tuple[tuple[np.ndarray, str], ...] = (),
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """The scene camera image, uint8 ``[size, size, 3]`` (see the module docstring)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.empty((size, size, 3), np.float64)
    img[...] = BACKGROUND
    for pos, name in (*distractors, (target_xy, colour)):
        c, r = to_pixels(pos, size)
        cover = np.clip(TARGET_RADIUS_PX + 0.5 - np.hypot(cols - c, rows - r), 0.0, 1.0)[..., None]
        img = img * (1.0 - cover) + np.asarray(COLOURS[name], np.float64) * cover
    c, r = to_pixels(agent_xy, size)
    ox = np.clip(np.minimum(cols + 0.5, c + AGENT_HALF_PX) - np.maximum(cols - 0.5, c - AGENT_HALF_PX), 0.0, 1.0)
    oy = np.clip(np.minimum(rows + 0.5, r + AGENT_HALF_PX) - np.maximum(rows - 0.5, r - AGENT_HALF_PX), 0.0, 1.0)
    cover = (ox * oy)[..., None]
    img = img * (1.0 - cover) + np.asarray(AGENT_COLOUR, np.float64) * cover
    return np.round(img).astype(np.uint8)


def expert_action(agent_xy: np.ndarray, target_xy: np.ndarray) -> np.ndarray:
    """The next position the expert commands: straight to the target, at most ``MAX_STEP`` away."""
    delta = np.asarray(target_xy, np.float64) - np.asarray(agent_xy, np.float64)
    dist = float(np.hypot(*delta))
    return np.asarray(target_xy, np.float64).copy() if dist <= MAX_STEP else agent_xy + delta * (MAX_STEP / dist)


def apply_command(agent_xy: np.ndarray, command_xy: np.ndarray) -> np.ndarray:
    """Dynamics: move towards the commanded position by at most ``MAX_STEP``, staying in ``[-1, 1]^2``."""
    command = np.clip(np.asarray(command_xy, np.float64).reshape(2), -1.0, 1.0)
    delta = command - agent_xy
    dist = float(np.hypot(*delta))
    step = delta if dist <= MAX_STEP else delta * (MAX_STEP / dist)
    return np.clip(agent_xy + step, -1.0, 1.0)


@dataclasses.dataclass
class ReachSetup:
    agent: np.ndarray  # float64 [2]
    target: np.ndarray  # float64 [2]
    colour: str
    distractors: tuple[tuple[np.ndarray, str], ...] = ()

    def render(self, agent_xy: np.ndarray) -> np.ndarray:
        return render(agent_xy, self.target, self.colour, distractors=self.distractors)


def sample_setup(rng: np.random.Generator, num_distractors: int = 0) -> ReachSetup:
    """A random start, target and colour (the distribution of the dataset and of ``ReachEnv.reset``)."""
    names = list(COLOURS)
    while True:
        agent = rng.uniform(-0.85, 0.85, 2)
        target = rng.uniform(-0.8, 0.8, 2)
        dist = float(np.hypot(*(target - agent)))
        if dist >= 2 * SUCCESS_RADIUS and math.ceil(dist / MAX_STEP) <= 13:
            break
    order = rng.permutation(len(names))
    colour = names[order[0]]
    distractors = []
    while len(distractors) < num_distractors:
        pos = rng.uniform(-0.8, 0.8, 2)
        if all(np.hypot(*(pos - p)) > 0.35 for p in [target, *(d[0] for d in distractors)]):
            distractors.append((pos, names[order[1 + len(distractors)]]))
    return ReachSetup(agent, target, colour, tuple(distractors))


@dataclasses.dataclass
class ReachEpisode:
    setup: ReachSetup
    states: np.ndarray  # float64 [L, 2]: agent_xy at each timestep
    actions: np.ndarray  # float64 [L, 2]: action_xy (commanded next position)

    @property
    def length(self) -> int:
        return len(self.states)


def make_episode(rng: np.random.Generator, num_distractors: int = 0) -> ReachEpisode:
    """One expert episode (see the module docstring)."""
    setup = sample_setup(rng, num_distractors)
    need = math.ceil(float(np.hypot(*(setup.target - setup.agent))) / MAX_STEP)
    length = int(rng.integers(max(EPISODE_LENGTHS[0], need + 2), EPISODE_LENGTHS[1] + 1))
    states, actions = [setup.agent.copy()], []
    for _ in range(length):
        actions.append(expert_action(states[-1], setup.target))
        states.append(actions[-1].copy())
    return ReachEpisode(setup, np.asarray(states[:length]), np.asarray(actions))


def window(values: np.ndarray, anchor: int, past: int = PAST, future: int = FUTURE) -> np.ndarray:
    """Rows ``anchor - past .. anchor + future`` of ``values [L, d]``, copy-padded at both ends."""
    idx = np.clip(np.arange(anchor - past, anchor + future + 1), 0, len(values) - 1)
    return values[idx]


def window_masks(anchor: int, length: int, past: int = PAST, future: int = FUTURE) -> tuple[np.ndarray, np.ndarray]:
    """``past_mask`` / ``future_mask`` bool ``[past + 1 + future]``: real (unpadded) past rows / current+future rows."""
    steps = np.arange(anchor - past, anchor + future + 1)
    inside = (steps >= 0) & (steps < length)
    rows = np.arange(past + 1 + future)
    return inside & (rows < past), inside & (rows >= past)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def make_sample(
    key: str,
    image: np.ndarray,
    agent_window: np.ndarray,
    action_window: np.ndarray,
    past_mask: np.ndarray,
    future_mask: np.ndarray,
    colour: str,
    metadata: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """One sample in the on-disk layout (also how ``ReachEnv`` observations reach the training transform)."""
    meta = {"anchor_relative_idx": PAST, "camera_names": [CAMERA], **(metadata or {})}
    return {
        "__key__": key,
        f"{CAMERA}_t0.png": png_bytes(image),
        "lowdim.npz": npz_bytes(
            {
                PROPRIO_FIELD: np.asarray(agent_window, np.float64),
                ACTION_FIELD: np.asarray(action_window, np.float64),
                "past_mask": np.asarray(past_mask, bool),
                "future_mask": np.asarray(future_mask, bool),
            }
        ),
        "metadata.json": _compact(meta),
        "language_instructions.json": _compact(instructions(colour)),
    }


def episode_samples(episode: ReachEpisode, episode_id: int, anchors: list[int]) -> list[tuple[dict, dict]]:
    """``(sample, lowdim windows)`` for each anchor of ``episode``."""
    out = []
    n = episode.length
    for t in anchors:
        past_mask, future_mask = window_masks(t, n)
        agent_w, action_w = window(episode.states, t), window(episode.actions, t)
        meta = {
            "episode_id": f"episode_{episode_id}",
            "sample_id": f"episode_{episode_id}_t{t:04d}",
            "anchor_timestep": t,
            "anchor_relative_idx": PAST,
            "image_timesteps": [t],
            "lowdim_start_timestep": t - PAST,
            "lowdim_end_timestep": t + FUTURE,
            "past_padding": max(0, PAST - t),
            "future_padding": max(0, t + FUTURE - (n - 1)),
            "original_episode_length": n,
            "original_image_sizes": {CAMERA: [IMAGE_SIZE, IMAGE_SIZE]},
            "is_padded": bool(t < PAST or t + FUTURE > n - 1),
        }
        key = f"ep{episode_id:05d}_t{t:02d}"
        sample = make_sample(
            key, episode.setup.render(episode.states[t]), agent_w, action_w, past_mask, future_mask,
            episode.setup.colour, meta,
        )  # fmt: skip
        lowdim = {PROPRIO_FIELD: agent_w, ACTION_FIELD: action_w, "mask": past_mask | future_mask}
        out.append((sample, lowdim))
    return out


def compute_stats(windows: list[dict[str, np.ndarray]], fields: tuple[str, ...]) -> dict[str, Any]:
    """stats.json content over sample windows (``{field: [T, d], "mask": [T]}``), in the original's layout.

    Per timestep over valid rows: mean, std (ddof 1; 0 with fewer than 2 rows), min, max, percentiles (numpy linear
    interpolation); global: count-weighted mean of the per-timestep means, std by the law of total variance
    (the original's formula), min, max and percentiles over all valid values; ``count [T]``.
    """
    masks = np.stack([w["mask"] for w in windows]).astype(bool)  # [n, T]
    stats: dict[str, Any] = {}
    for field in fields:
        x = np.stack([np.asarray(w[field], np.float64) for w in windows])  # [n, T, d]
        T, d = x.shape[1:]
        count = masks.sum(0)
        mean_t, std_t = np.zeros((T, d)), np.zeros((T, d))
        min_t, max_t = np.full((T, d), np.inf), np.full((T, d), -np.inf)
        pct_t = {p: np.zeros((T, d)) for p in (1, 2, 5, 95, 98, 99)}
        for t in range(T):
            rows = x[masks[:, t], t]
            if len(rows) == 0:
                continue
            mean_t[t] = rows.mean(0)
            std_t[t] = rows.std(0, ddof=1) if len(rows) > 1 else 0.0
            min_t[t], max_t[t] = rows.min(0), rows.max(0)
            for p in pct_t:
                pct_t[p][t] = np.percentile(rows, p, axis=0)
        w = count / count.sum()
        mean = (w[:, None] * mean_t).sum(0)
        std = np.sqrt((w[:, None] * std_t**2).sum(0) + (w[:, None] * (mean_t - mean) ** 2).sum(0))
        valid = x[masks]  # [m, d]
        entry: dict[str, Any] = {
            "mean": mean,
            "std": std,
            "min": valid.min(0),
            "max": valid.max(0),
            "mean_per_timestep": mean_t,
            "std_per_timestep": std_t,
            "min_per_timestep": min_t,
            "max_per_timestep": max_t,
        }
        for p in pct_t:
            entry[f"percentile_{p}"] = np.percentile(valid, p, axis=0)
        entry["percentile_sample_count"] = count
        entry["tdigest_state"] = None
        for p in pct_t:
            entry[f"percentile_{p}_per_timestep"] = pct_t[p]
        entry["tdigest_state_per_timestep"] = None
        entry["count"] = count
        stats[field] = {
            k: (None if v is None else np.round(np.asarray(v, np.float64), 8).tolist()) for k, v in entry.items()
        }
    return stats


def write_reach_split(
    out_dir: str,
    *,
    num_samples: int,
    seed: int,
    samples_per_episode: int = 1,
    samples_per_shard: int = 128,
    num_distractors: int = 0,
) -> str:
    """Write one split (shards, manifest, stats.json, preprocessing_config.yaml, processing_metadata.json)."""
    import yaml

    rng = np.random.default_rng(seed)
    pairs: list[tuple[dict, dict]] = []
    episode_id = 0
    while len(pairs) < num_samples:
        ep = make_episode(rng, num_distractors)
        k = min(samples_per_episode, ep.length, num_samples - len(pairs))
        anchors = sorted(int(a) for a in rng.choice(ep.length, size=k, replace=False))
        pairs.extend(episode_samples(ep, episode_id, anchors))
        episode_id += 1
    manifest = write_shards(out_dir, [s for s, _ in pairs], samples_per_shard=samples_per_shard)
    stats = compute_stats([w for _, w in pairs], (PROPRIO_FIELD, ACTION_FIELD))
    with open(os.path.join(out_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, separators=(",", ":"))
    config = {
        "type": "tiny_reach",
        "camera_names": [CAMERA],
        "image_indices": [0],
        "past_lowdim_steps": PAST,
        "future_lowdim_steps": FUTURE,
        "resize_images_size": [IMAGE_SIZE, IMAGE_SIZE],
        "image_format": "png",
        "padding_strategy": "copy",
        "max_padding_left": PAST,
        "max_padding_right": FUTURE,
        "stride": 1,
        "samples_per_episode": samples_per_episode,
        "samples_per_shard": samples_per_shard,
        "action_fields": [ACTION_FIELD],
        "proprioception_fields": [PROPRIO_FIELD],
        "max_step": MAX_STEP,
        "success_radius": SUCCESS_RADIUS,
        "episode_lengths": list(EPISODE_LENGTHS),
        "num_distractors": num_distractors,
        "seed": seed,
        "compute_statistics": True,
    }
    with open(os.path.join(out_dir, "preprocessing_config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=True)
    metadata = {
        "metadata_version": "1.0",
        "command_line": {"script_name": "launch/make_tiny_datasets.py"},
        "arguments": config,
        "num_episodes": episode_id,
        "num_samples": len(pairs),
    }
    with open(os.path.join(out_dir, "processing_metadata.json"), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=1, sort_keys=True)
    return manifest


def make_tiny_robotics_datasets(
    out_dir: str,
    *,
    num_train: int = 544,
    num_val: int = 64,
    samples_per_episode: int = 1,
    samples_per_shard: int = 136,
    num_distractors: int = 0,
    seed: int = 0,
) -> dict[str, str]:
    """Write ``<out_dir>/reach/train`` and ``<out_dir>/reach/val``; returns their manifests."""
    root = os.path.join(out_dir, "reach")
    kw = dict(
        samples_per_episode=samples_per_episode, samples_per_shard=samples_per_shard, num_distractors=num_distractors
    )
    return {
        "reach_train": write_reach_split(
            os.path.join(root, "train"), num_samples=num_train, seed=seed * 1000 + 11, **kw
        ),
        "reach_val": write_reach_split(os.path.join(root, "val"), num_samples=num_val, seed=seed * 1000 + 12, **kw),
    }


# ---------------------------------------------------------------- environment


class ReachEnv:
    """The reach task as an environment (numpy; no rendering differences from the dataset).

    ``reset(seed)`` -> obs; ``step(action_xy)`` -> ``(obs, done, success)``. ``obs`` =
    ``{"image": uint8 [32, 32, 3], "agent_xy": float64 [2], "instruction": str}``. The commanded position is
    clipped to ``[-1, 1]^2`` and to ``MAX_STEP`` from the agent; ``success`` when the agent is within
    ``SUCCESS_RADIUS`` of the target; ``done`` on success or after ``max_steps`` steps.
    """

    def __init__(self, *, max_steps: int = 24, num_distractors: int = 0) -> None:
        self.max_steps = max_steps
        self.num_distractors = num_distractors
        self.setup: ReachSetup | None = None
        self.agent = np.zeros(2)
        self.steps = 0

    def _obs(self) -> dict[str, Any]:
        assert self.setup is not None
        return {
            "image": self.setup.render(self.agent),
            "agent_xy": self.agent.copy(),
            "instruction": instruction(self.setup.colour),
        }

    def reset(self, seed: int) -> dict[str, Any]:
        self.setup = sample_setup(np.random.default_rng(seed), self.num_distractors)
        self.agent = self.setup.agent.copy()
        self.steps = 0
        return self._obs()

    @property
    def success(self) -> bool:
        return self.setup is not None and float(np.hypot(*(self.agent - self.setup.target))) <= SUCCESS_RADIUS

    def expert_action(self) -> np.ndarray:
        assert self.setup is not None, "call reset() first"
        return expert_action(self.agent, self.setup.target)

    def step(self, action_xy: np.ndarray) -> tuple[dict[str, Any], bool, bool]:
        if self.setup is None:
            raise RuntimeError("ReachEnv.step called before reset().")
        self.agent = apply_command(self.agent, action_xy)
        self.steps += 1
        success = self.success
        return self._obs(), success or self.steps >= self.max_steps, success
