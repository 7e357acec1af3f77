"""Roll a trained reach policy out in ``ReachEnv`` (``launch.eval_policy``), against a random policy.

The policy (EMA weights when the run kept them, ``use_ema``) is rebuilt from its checkpoint; each observation
goes through the training transform (the sample is written in the dataset's layout: current image, agent
position now and one step before, the previous command as the known past action), ``sample_actions`` denoises an
action window, the window is denormalised with the run's stats and its first ``execute_steps`` future commands
are executed before replanning (receding horizon). All episodes run in lockstep as one batch. A random policy
(uniform commands in the square) on the same episode seeds gives ``random_success_rate``. A PNG
(``plot``, default ``<run_dir>/eval_policy.png``) draws, for a few validation samples, the scene (upscaled), the
expert's future commands (green) and the predicted ones (magenta). :func:`evaluate` returns every figure.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import paths
from vla_foundry_jax.data.pipeline import build_eval_iterator
from vla_foundry_jax.data.robotics import robotics_transform
from vla_foundry_jax.errors import UsageError
from vla_foundry_jax.models.diffusion_policy import sample_actions
from vla_foundry_jax.sampling import load_run_model
from vla_foundry_jax.testbeds.tiny_robotics import (
    ACTION_FIELD,
    FUTURE,
    PAST,
    PROPRIO_FIELD,
    ReachEnv,
    make_sample,
    to_pixels,
)


def load_policy(run_dir: str, *, use_ema: bool = True) -> tuple[Any, Any]:
    """``(DiffusionPolicy, experiment params)`` of the latest checkpoint under ``run_dir`` (EMA weights if kept)."""
    kind = ckpt_lib.load_experiment_params(run_dir).model.type
    if kind != "diffusion_policy":
        raise UsageError(f"{run_dir} holds a {kind!r} model, not a diffusion_policy.")
    model, exp, _ = load_run_model(run_dir, use_ema=use_ema)
    return model, exp


def check_reach_run(exp: Any) -> None:
    """Raise ValueError unless the run trains on the tiny reach task's robotics layout."""
    data = exp.data
    if data.type != "robotics" or list(data.action_fields) != [ACTION_FIELD]:
        raise UsageError(
            f"eval_policy rolls out the tiny reach task: the run must train on robotics data with action_fields "
            f"['{ACTION_FIELD}'] (got {data.type!r}, {list(getattr(data, 'action_fields', []))})."
        )
    if list(data.proprioception_fields) not in ([], [PROPRIO_FIELD]) or tuple(data.image_names) != ("scene_t0",):
        raise UsageError(
            f"eval_policy needs proprioception_fields [] or ['{PROPRIO_FIELD}'] and image_names ['scene_t0'] "
            f"(got {list(data.proprioception_fields)}, {list(data.image_names)})."
        )
    if (data.lowdim_past_timesteps, data.lowdim_future_timesteps) != (PAST, FUTURE):
        raise UsageError(
            f"eval_policy builds windows of past {PAST} / future {FUTURE}; the run uses "
            f"{data.lowdim_past_timesteps} / {data.lowdim_future_timesteps}."
        )


def observation_sample(obs: dict[str, Any], prev_agent: np.ndarray | None, prev_action: np.ndarray | None) -> dict:
    """An env observation as a dataset sample: rows ``t-1 .. t+7``; the past row holds the previous position and
    command (``past_mask`` False at the first step, copy-padded as in the dataset); future rows are unknown
    (copies; the policy only reads the past and current rows)."""
    agent = np.asarray(obs["agent_xy"], np.float64)
    steps = PAST + 1 + FUTURE
    agent_w = np.repeat(agent[None], steps, 0)
    action_w = np.repeat(agent[None], steps, 0)
    first = prev_agent is None
    if not first:
        agent_w[0] = prev_agent
        action_w[0] = prev_action
    past_mask = np.zeros(steps, bool)
    past_mask[0] = not first
    future_mask = np.arange(steps) >= PAST
    colour = obs["instruction"].split()[-2]
    return make_sample("obs", obs["image"], agent_w, action_w, past_mask, future_mask, colour)


def stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def rollout(
    predict: Callable[[dict[str, np.ndarray]], np.ndarray],
    transform: Any,
    *,
    num_episodes: int,
    seed: int = 0,
    execute_steps: int = 4,
    max_steps: int = 24,
) -> dict[str, Any]:
    """Run ``num_episodes`` reach episodes (env seeds ``seed .. seed + n - 1``) in lockstep.

    ``predict(batch) -> actions [B, Ta, 2]`` in raw units (positions); the commands of rows ``past .. past +
    execute_steps - 1`` are executed, then the policy replans. Returns ``success_rate``, per-episode ``successes``
    and ``steps``.
    """
    if not 1 <= execute_steps <= FUTURE + 1:
        raise UsageError(f"execute_steps must be in [1, {FUTURE + 1}], got {execute_steps}.")
    envs = [ReachEnv(max_steps=max_steps) for _ in range(num_episodes)]
    obs = [env.reset(seed + i) for i, env in enumerate(envs)]
    prev_agent: list[np.ndarray | None] = [None] * num_episodes
    prev_action: list[np.ndarray | None] = [None] * num_episodes
    done, success = [False] * num_episodes, [False] * num_episodes
    steps = [0] * num_episodes
    rng = np.random.default_rng(seed)
    while not all(done):
        batch = stack(
            [
                transform(observation_sample(o, pa, pc), rng)
                for o, pa, pc in zip(obs, prev_agent, prev_action, strict=True)
            ]
        )
        plan = np.asarray(predict(batch))
        for k in range(execute_steps):
            for i, env in enumerate(envs):
                if done[i]:
                    continue
                command = plan[i, PAST + k]
                prev_agent[i], prev_action[i] = obs[i]["agent_xy"], command
                obs[i], done[i], success[i] = env.step(command)
                steps[i] += 1
    return {"success_rate": float(np.mean(success)), "successes": success, "steps": steps}


def random_rollout(*, num_episodes: int, seed: int = 0, max_steps: int = 24) -> float:
    """Success rate of uniform random commands in ``[-1, 1]^2`` on the same episode seeds."""
    rng = np.random.default_rng(seed + 10**6)
    wins = 0
    for i in range(num_episodes):
        env = ReachEnv(max_steps=max_steps)
        env.reset(seed + i)
        done, ok = False, False
        while not done:
            _, done, ok = env.step(rng.uniform(-1.0, 1.0, 2))
        wins += ok
    return wins / max(num_episodes, 1)


def draw_predictions(
    pixel_values: np.ndarray,
    true_actions: np.ndarray,
    pred_actions: np.ndarray,
    future_mask: np.ndarray,
    image_config: Any,
    path: str,
    *,
    scale: int = 8,
) -> str:
    """A PNG grid: each validation scene upscaled ``scale`` times with the expert's future commands (green) and
    the predicted ones (magenta) over the rows where ``future_mask`` holds. ``pixel_values [k, H, W, 3]``
    processor-normalised; actions ``[k, Ta, 2]`` in raw units."""
    from PIL import Image, ImageDraw

    mean, std = np.asarray(image_config.mean), np.asarray(image_config.std)
    tiles = []
    for img, true, pred, mask in zip(pixel_values, true_actions, pred_actions, future_mask, strict=True):
        raw = np.clip(((img * std + mean) / image_config.rescale_factor).round(), 0, 255).astype(np.uint8)
        size = raw.shape[0]
        tile = Image.fromarray(raw).resize((size * scale, size * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)

        for traj, colour in ((true[mask], (60, 230, 90)), (pred[mask], (240, 60, 240))):
            p = [tuple((np.asarray(to_pixels(xy, size)) + 0.5) * scale) for xy in traj]
            if len(p) > 1:
                draw.line(p, fill=colour, width=2)
            for x, y in p:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour)
        tiles.append(np.asarray(tile))
    grid = np.concatenate(tiles, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    paths.write_bytes(path, buffer.getvalue())  # local, s3:// or gs:// (beside a run on a store)
    return path


def evaluate(
    run_dir: str,
    *,
    num_episodes: int = 50,
    num_inference_steps: int | None = 10,
    execute_steps: int = 4,
    max_steps: int = 24,
    seed: int = 0,
    use_ema: bool = True,
    plot: str | None = None,
    num_plot_samples: int = 4,
) -> dict[str, Any]:
    """Roll the policy of ``run_dir`` out (see the module docstring). Returns ``success_rate``,
    ``random_success_rate``, ``num_episodes``, ``mean_steps`` and, when the run has validation data and
    ``num_plot_samples`` > 0, ``val_action_error`` (mean distance of predicted to expert future commands) and
    ``plot`` (the PNG's path)."""
    model, exp = load_policy(run_dir, use_ema=use_ema)
    check_reach_run(exp)
    transform = robotics_transform(exp.data, train=False)
    normalizer = transform.normalizer
    key = [jax.random.PRNGKey(seed)]

    def predict_normalised(batch: dict[str, np.ndarray]) -> np.ndarray:
        key[0], sub = jax.random.split(key[0])
        return np.asarray(sample_actions(model, batch, sub, num_inference_steps=num_inference_steps))

    result = rollout(
        lambda b: normalizer.denormalize_actions(predict_normalised(b)),
        transform,
        num_episodes=num_episodes,
        seed=seed,
        execute_steps=execute_steps,
        max_steps=max_steps,
    )
    out = {
        "success_rate": result["success_rate"],
        "random_success_rate": random_rollout(num_episodes=num_episodes, seed=seed, max_steps=max_steps),
        "num_episodes": num_episodes,
        "mean_steps": float(np.mean(result["steps"])),
    }
    if exp.data.val_dataset_manifest and num_plot_samples > 0:
        it = build_eval_iterator(exp.data, global_batch_size=num_plot_samples)
        batch = next(iter(it))
        pred = normalizer.denormalize_actions(predict_normalised(batch))
        true = normalizer.denormalize_actions(batch["actions"])
        mask = batch["future_mask"] & batch["valid"][:, None]
        err = np.linalg.norm(pred - true, axis=-1)[mask]
        out["val_action_error"] = float(err.mean())
        path = plot or paths.join(run_dir, "eval_policy.png")
        out["plot"] = draw_predictions(
            batch["pixel_values"][:, 0], true, pred, mask, transform.processor.image_config, path
        )
    return out
