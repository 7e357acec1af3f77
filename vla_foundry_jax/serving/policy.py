"""A trained ``diffusion_policy`` for robot code: observations in, named absolute actions out.

``Policy.from_run(run_dir)`` rebuilds the policy (EMA weights when kept) with the run's own data files
(:mod:`~vla_foundry_jax.training.run_data`), and compiles one sampling call per batch size at load. Each robot (or
each client of the server) gets a :class:`Session` (``policy.new_session(seed)``) holding the history the model was
trained with; ``policy.step_batch(sessions, observations)`` advances several sessions with one device call.

**Observation** (one control step, as the robot gives it)::

    {"images": {camera: uint8 [H, W, 3]},      any size; resized as the dataset was (resize_images_size)
     "proprio": {field: float [d]},            the model's proprioception fields (+ states of relative actions)
     "instruction": str}

Per step the session keeps the last frames of each camera (as many as the trained ``image_indices`` span), the
last ``past + 1`` proprioception vectors and the last ``past`` executed actions (absolute, raw units); the first
observation of a session copy-pads the frames and proprioception and marks no past action (as the dataset's
episode starts). The model input is built as training did: images resized to the dataset's size, centre-cropped
when training cropped, processor-normalised; the instruction tokenised with one image placeholder per image;
proprioception and past actions normalised with the run's statistics (relative actions made relative to the
current state first).

**Sampling**: per-row keys ``fold_in(fold_in(key(seed), session.seed), session.step)``, so a session samples the
same actions in any batch. Actions are denormalised; a relative action field ``A_relative`` (the preprocessing
config's ``relative_actions`` spec ``A:S[:dims]``) is made absolute by adding the current state ``S`` on its dims
and returned as ``A``.

**Execution** (per session, :class:`Execution`): ``receding`` executes the first ``execute_steps`` actions of a
chunk (current step first) before replanning; ``ensemble`` replans every step and executes, for the current step,
the average of every chunk's prediction for it with ACT's weights ``exp(-ensemble_decay * i)`` (``i = 0`` the
oldest prediction). The executed action is what the session records as the past action.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vla_foundry_jax.cpu_threads import pin_xla_cpu_workers
from vla_foundry_jax.data.augment import augment_images
from vla_foundry_jax.data.qwen_processor import QwenVLProcessor
from vla_foundry_jax.data.robotics import RoboticsTransform, robotics_transform
from vla_foundry_jax.errors import UsageError, VLAFoundryError
from vla_foundry_jax.models.diffusion_policy import action_sampler
from vla_foundry_jax.sampling import load_run_model
from vla_foundry_jax.training.run_data import run_dir_of, run_preprocessing_config


@jax.jit
def _row_keys(key: jax.Array, seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """``fold_in(fold_in(key, seed), step)`` per row."""
    return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(key, a), b))(seeds, steps)


class ObservationError(VLAFoundryError, ValueError):
    """An observation the policy cannot take; ``field`` names the offending entry."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a session turns chunks into executed actions (module docstring)."""

    mode: str = "receding"
    execute_steps: int = 1
    ensemble_decay: float = 0.01

    def check(self, horizon: int) -> Execution:
        if self.mode not in ("receding", "ensemble"):
            raise UsageError(f"execution mode {self.mode!r}: use 'receding' or 'ensemble'.")
        if self.mode == "receding" and not 1 <= self.execute_steps <= horizon:
            raise UsageError(f"execute_steps must be in [1, {horizon}] (the action horizon), got {self.execute_steps}.")
        if not self.ensemble_decay >= 0:
            raise UsageError(f"ensemble_decay must be >= 0, got {self.ensemble_decay}.")
        return self


def parse_relative_actions(specs: Sequence[str], action_fields: Sequence[str]) -> dict[str, tuple[str, str, Any]]:
    """``{action field: (absolute name, state field, dims or None)}`` for the trained ``*_relative`` fields."""
    out = {}
    for spec in specs:
        parts = str(spec).split(":")
        if len(parts) not in (2, 3):
            continue
        action, state = parts[0], parts[1]
        dims = None
        if len(parts) == 3:
            dims = []
            for chunk in parts[2].split(","):
                lo, _, hi = chunk.partition("-")
                dims.extend(range(int(lo), int(hi or lo) + 1))
        if f"{action}_relative" in action_fields:
            out[f"{action}_relative"] = (action, state, dims)
    return out


def resize_like_dataset(image: np.ndarray, size: Sequence[int] | None, method: str | None) -> np.ndarray:
    """The conversion's resize (PIL bilinear to ``size = (h, w)``, centre-cropping to its aspect first for
    ``center_crop``); unchanged when ``size`` is None or already met."""
    if size is None or tuple(image.shape[:2]) == tuple(size):
        return image
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    im = Image.fromarray(image)
    if method == "center_crop":
        scale = max(w / im.width, h / im.height)
        cw, ch = min(im.width, round(w / scale)), min(im.height, round(h / scale))
        left, top = (im.width - cw) // 2, (im.height - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
    return np.asarray(im.resize((w, h), Image.BILINEAR))


@dataclasses.dataclass
class StepResult:
    """One session's step: the action to execute now and the newest chunk (current step first), both absolute."""

    action: dict[str, np.ndarray]
    chunk: dict[str, np.ndarray]
    replanned: bool


class Session:
    """One robot's history and execution state (module docstring). Made by :meth:`Policy.new_session`."""

    def __init__(self, policy: Policy, seed: int, execution: Execution) -> None:
        self.policy = policy
        self.seed = int(seed)
        self.execution = execution.check(policy.horizon)
        self.step = 0
        self.frames: collections.deque = collections.deque(maxlen=policy.frame_span)
        self.proprio: collections.deque = collections.deque(maxlen=policy.past + 1)
        self.actions: collections.deque = collections.deque(maxlen=max(policy.past, 1))
        self.instruction = ""
        self.queue: list[np.ndarray] = []  # receding: planned actions not yet executed
        self.chunks: list[tuple[int, np.ndarray]] = []  # ensemble: (start step, absolute chunk [horizon, A])
        self.last_chunk: np.ndarray | None = None

    def needs_plan(self) -> bool:
        return self.execution.mode == "ensemble" or not self.queue

    def push(self, obs: dict[str, Any]) -> None:
        """Add a checked observation (see :meth:`Policy.check`) to the history."""
        first = not self.proprio
        reps = self.frames.maxlen if first else 1
        for _ in range(reps):
            self.frames.append(obs["images"])
        for _ in range(self.proprio.maxlen if first else 1):
            self.proprio.append(obs["proprio"])
        self.instruction = obs["instruction"]

    def add_chunk(self, chunk: np.ndarray) -> None:
        self.last_chunk = chunk
        if self.execution.mode == "receding":
            self.queue = list(chunk[: self.execution.execute_steps])
        else:
            self.chunks = [(s, c) for s, c in self.chunks if self.step - s < len(c)] + [(self.step, chunk)]

    def next_action(self) -> np.ndarray:
        if self.execution.mode == "receding":
            action = self.queue.pop(0)
        else:
            preds = np.stack([c[self.step - s] for s, c in self.chunks])  # oldest first
            w = np.exp(-self.execution.ensemble_decay * np.arange(len(preds)))
            action = (w[:, None] * preds).sum(0) / w.sum()
        self.actions.append(np.asarray(action, np.float64))
        self.step += 1
        return action


class Policy:
    """A trained ``diffusion_policy`` with its data layout; see the module docstring."""

    def __init__(
        self,
        model: Any,
        exp: Any,
        transform: RoboticsTransform,
        preprocessing: dict[str, Any] | None,
        *,
        num_flow_steps: int | None,
        seed: int = 0,
        batch_sizes: Sequence[int] = (1,),
        pin_cpu_threads: bool = True,
    ) -> None:
        data = transform.data
        self.model = model
        self.exp, self.data, self.transform = exp, data, transform
        self.normalizer, self.processor = transform.normalizer, transform.processor
        self.num_flow_steps = num_flow_steps
        self.past, self.future = int(data.lowdim_past_timesteps), int(data.lowdim_future_timesteps)
        self.horizon = self.future + 1  # actions from the current step on
        self.window = self.past + 1 + self.future
        self.image_names = list(data.image_names)
        self.images: list[tuple[str, int]] = []
        for name in self.image_names:
            camera, _, index = name.rpartition("_t")
            self.images.append((camera, int(index)))
        self.cameras = list(dict.fromkeys(c for c, _ in self.images))
        low = min(i for _, i in self.images)
        self.frame_span = max(i for _, i in self.images) - low + 1
        self.latest_index = max(i for _, i in self.images)
        cfg = preprocessing or {}
        self.dataset_image_size = cfg.get("resize_images_size")
        self.resize_method = cfg.get("image_resizing_method")
        self.action_fields = list(data.action_fields)
        self.relative = parse_relative_actions(cfg.get("relative_actions") or [], self.action_fields)
        self.action_dims = {f: self.normalizer.field_dim(f) for f in self.action_fields}
        self.proprio_fields = list(data.proprioception_fields)
        needed = dict.fromkeys(self.proprio_fields)
        for _, state, _ in self.relative.values():
            needed[state] = None
        self.proprio_dims = {f: self.normalizer.field_dim(f) for f in needed}
        self.output_fields = {self.relative.get(f, (f,))[0]: d for f, d in self.action_dims.items()}
        self.key = jax.random.PRNGKey(seed)
        self._sample = action_sampler(model, num_inference_steps=num_flow_steps)
        self._tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
        # a call after an idle gap otherwise may run its two workers on one core (cpu_threads); CPU backend only
        self.pinned_cpu_threads = pin_xla_cpu_workers() if pin_cpu_threads else {}
        for b in self.batch_sizes:  # compile every batch size now: no compile while serving
            jax.block_until_ready(self._sample(self._dummy_batch(b), self._keys([(0, 0)] * b)))

    @classmethod
    def from_run(
        cls,
        run_dir: str,
        *,
        num_flow_steps: int | None = None,
        use_ema: bool = True,
        seed: int = 0,
        batch_sizes: Sequence[int] = (1,),
        pin_cpu_threads: bool = True,
    ) -> Policy:
        """The policy of ``run_dir`` (run, ``checkpoints/`` or a step directory); ``num_flow_steps`` None: the
        scheduler's own number of steps; ``batch_sizes``: the batch sizes compiled at load (a larger batch of
        sessions is split, a smaller one padded to the next size); ``pin_cpu_threads``: on the CPU backend, pin
        XLA's worker threads one per core (:mod:`~vla_foundry_jax.cpu_threads`), which keeps a call after an idle
        gap as fast as back-to-back calls."""
        model, exp, _ = load_run_model(run_dir, use_ema=use_ema)
        if exp.model.type != "diffusion_policy" or exp.data.type != "robotics":
            raise UsageError(
                f"{run_dir} holds a {exp.model.type!r} model trained on {exp.data.type!r} data; serving needs a "
                "diffusion_policy trained on robotics data."
            )
        transform = robotics_transform(exp.data, train=False)
        if isinstance(transform.processor, QwenVLProcessor):
            raise UsageError(
                f"{run_dir} reads its images with a Qwen-VL processor (flat patches + image_grid_thw); serving does "
                "not build such observations yet: evaluate it with launch.eval_policy_offline."
            )
        pre = run_preprocessing_config(run_dir_of(run_dir))
        return cls(
            model,
            exp,
            transform,
            pre,
            num_flow_steps=num_flow_steps,
            seed=seed,
            batch_sizes=batch_sizes,
            pin_cpu_threads=pin_cpu_threads,
        )

    # ------------------------------------------------------------------ metadata and checks

    def metadata(self) -> dict[str, Any]:
        """What a client must send and gets back."""
        size = self.dataset_image_size or list(self.processor.image_size)
        return {
            "model": self.exp.model.type,
            "cameras": self.cameras,
            "image_names": self.image_names,
            "image_size": [int(s) for s in size],
            "proprio_fields": dict(self.proprio_dims),
            "action_fields": dict(self.output_fields),
            "action_horizon": self.horizon,
            "past_steps": self.past,
            "num_flow_steps": self.num_flow_steps,
            "batch_sizes": list(self.batch_sizes),
        }

    def check(self, obs: Any) -> dict[str, Any]:
        """A validated copy of ``obs`` (images resized to the dataset's size, proprio float64) or ObservationError."""
        if not isinstance(obs, dict):
            got = type(obs).__name__
            raise ObservationError("observation", f"expected a map with images, proprio, instruction; got {got}.")
        images = obs.get("images")
        if not isinstance(images, dict):
            raise ObservationError("images", f"expected a map camera -> uint8 [H, W, 3] image for {self.cameras}.")
        checked_images = {}
        for cam in self.cameras:
            if cam not in images:
                got = sorted(map(str, images))
                raise ObservationError(f"images.{cam}", f"missing; expected cameras {self.cameras}, got {got}.")
            im = images[cam]
            ok = isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] == 3
            if not ok or 0 in im.shape:
                got = f"{im.dtype} {list(im.shape)}" if isinstance(im, np.ndarray) else type(im).__name__
                raise ObservationError(f"images.{cam}", f"expected a uint8 [H, W, 3] image, got {got}.")
            checked_images[cam] = resize_like_dataset(im, self.dataset_image_size, self.resize_method)
        proprio = obs.get("proprio", {})
        if not isinstance(proprio, dict):
            raise ObservationError("proprio", f"expected a map field -> float vector for {list(self.proprio_dims)}.")
        checked_proprio = {}
        for field, dim in self.proprio_dims.items():
            if field not in proprio:
                raise ObservationError(f"proprio.{field}", f"missing; expected fields {dict(self.proprio_dims)}.")
            try:
                v = np.asarray(proprio[field], np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise ObservationError(f"proprio.{field}", f"expected {dim} numbers.") from None
            if v.shape != (dim,):
                raise ObservationError(f"proprio.{field}", f"expected {dim} values, got {v.size}.")
            if not np.isfinite(v).all():
                raise ObservationError(f"proprio.{field}", f"expected finite values, got {v.tolist()}.")
            checked_proprio[field] = v
        instruction = obs.get("instruction", "")
        if not isinstance(instruction, str):
            raise ObservationError("instruction", f"expected a string, got {type(instruction).__name__}.")
        return {"images": checked_images, "proprio": checked_proprio, "instruction": instruction}

    def new_session(self, seed: int = 0, execution: Execution | None = None) -> Session:
        return Session(self, seed, execution or Execution())

    # ------------------------------------------------------------------ model input

    def _tokens_for(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        if instruction not in self._tokens:
            if len(self._tokens) > 1024:
                self._tokens.clear()
            where = f"instruction {instruction[:60]!r}"
            self._tokens[instruction] = self.transform.text_tokens(instruction, len(self.image_names), where)
        return self._tokens[instruction]

    def _row(self, s: Session) -> dict[str, np.ndarray]:
        """The training-layout sample of a session's history."""
        frames = list(s.frames)
        raw = [frames[len(frames) - 1 - (self.latest_index - i)][cam] for cam, i in self.images]
        raw = augment_images(raw, self.data.augmentation, None, train=False)
        pixels = np.stack([self.processor.preprocess_image(im) for im in raw]).astype(np.float32)
        ids, mask = self._tokens_for(s.instruction)
        state_now = s.proprio[-1]
        past_rows = list(s.actions)[-self.past :] if self.past and s.step else []
        past_mask = np.zeros(self.window, bool)
        past_mask[self.past - len(past_rows) : self.past] = True
        parts, offset = [], 0
        for field, dim in self.action_dims.items():
            w = np.zeros((self.window, dim), np.float64)  # rows outside past_mask are never read by the sampler
            for j, a in enumerate(past_rows):
                w[self.past - len(past_rows) + j] = a[offset : offset + dim]
            if field in self.relative:
                _, state, dims = self.relative[field]
                use = list(range(dim)) if dims is None else dims
                w[np.ix_(past_mask, use)] -= state_now[state][use]
            parts.append(self.normalizer.normalize(field, w.astype(np.float32), anchor=self.past))
            offset += dim
        row = {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixels,
            "attention_mask_images": np.ones(len(self.image_names), bool),
            "actions": np.concatenate(parts, -1),
            "past_mask": past_mask,
        }
        if self.proprio_fields:
            props = [
                self.normalizer.normalize(f, np.stack([p[f] for p in s.proprio]).astype(np.float32), anchor=self.past)
                for f in self.proprio_fields
            ]
            row["proprioception"] = np.concatenate(props, -1)
        return row

    def _dummy_batch(self, b: int) -> dict[str, np.ndarray]:
        ids, mask = self._tokens_for("")
        h, w = self.processor.image_size
        n, A = len(self.image_names), sum(self.action_dims.values())
        batch = {
            "input_ids": np.repeat(ids[None], b, 0),
            "attention_mask": np.repeat(mask[None], b, 0),
            "pixel_values": np.zeros((b, n, h, w, 3), np.float32),
            "attention_mask_images": np.ones((b, n), bool),
            "actions": np.zeros((b, self.window, A), np.float32),
            "past_mask": np.zeros((b, self.window), bool),
        }
        if self.proprio_fields:
            P = sum(self.normalizer.field_dim(f) for f in self.proprio_fields)
            batch["proprioception"] = np.zeros((b, self.past + 1, P), np.float32)
        return batch

    def _keys(self, seeds_steps: Sequence[tuple[int, int]]) -> jax.Array:
        seeds, steps = (np.asarray(v, np.uint32) for v in zip(*seeds_steps, strict=True))
        return _row_keys(self.key, seeds, steps)

    def _absolute(self, actions: np.ndarray, sessions: Sequence[Session]) -> np.ndarray:
        """Normalised ``[n, window, A]`` -> absolute raw ``[n, horizon, A]`` (current step first)."""
        raw = np.asarray(self.normalizer.denormalize_actions(actions, anchor=self.past), np.float64)[:, self.past :]
        offset = 0
        for field, dim in self.action_dims.items():
            if field in self.relative:
                _, state, dims = self.relative[field]
                use = np.asarray(list(range(dim)) if dims is None else dims) + offset
                for i, s in enumerate(sessions):
                    raw[i, :, use] += s.proprio[-1][state][use - offset][:, None]
            offset += dim
        return raw

    def bucket(self, n: int) -> int:
        return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

    def plan(self, sessions: Sequence[Session]) -> np.ndarray:
        """Absolute chunks ``[n, horizon, A]`` for the sessions' current histories (device calls padded to the
        compiled batch sizes)."""
        out = []
        for start in range(0, len(sessions), self.batch_sizes[-1]):
            group = sessions[start : start + self.batch_sizes[-1]]
            rows = [self._row(s) for s in group]
            b = self.bucket(len(rows))
            rows += [rows[-1]] * (b - len(rows))
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            keys = self._keys([(s.seed, s.step) for s in group] + [(0, 0)] * (b - len(group)))
            actions = np.asarray(self._sample(batch, keys))[: len(group)]
            out.append(self._absolute(actions, group))
        return np.concatenate(out)

    def named(self, actions: np.ndarray) -> dict[str, np.ndarray]:
        """``[..., A]`` -> ``{output field: [..., d]}`` (relative fields under their absolute name)."""
        parts = np.split(np.asarray(actions, np.float32), np.cumsum(list(self.output_fields.values()))[:-1], axis=-1)
        return dict(zip(self.output_fields, parts, strict=True))

    def step_batch(self, sessions: Sequence[Session], observations: Sequence[Any]) -> list[StepResult]:
        """Advance each session by one control step (one device call for all that replan).

        Every observation is checked before any session changes: one bad observation raises ObservationError and
        leaves all sessions as they were.
        """
        return self.advance(sessions, [self.check(o) for o in observations])

    def advance(self, sessions: Sequence[Session], checked: Sequence[dict[str, Any]]) -> list[StepResult]:
        """:meth:`step_batch` for observations already passed through :meth:`check`."""
        if len({id(s) for s in sessions}) != len(sessions):
            raise UsageError("step_batch got the same session twice; one observation per session and step.")
        for s, o in zip(sessions, checked, strict=True):
            s.push(o)
        replan = [s for s in sessions if s.needs_plan()]
        if replan:
            for s, chunk in zip(replan, self.plan(replan), strict=True):
                s.add_chunk(chunk)
        out = []
        for s in sessions:
            action = s.next_action()
            out.append(StepResult(self.named(action), self.named(s.last_chunk), any(s is r for r in replan)))
        return out

    def step(self, session: Session, observation: Any) -> StepResult:
        return self.step_batch([session], [observation])[0]

    def infer_batch(self, sessions: Sequence[Session], observations: Sequence[Any]) -> list[StepResult]:
        """Alias of :meth:`step_batch` (the server's batched call)."""
        return self.step_batch(sessions, observations)
