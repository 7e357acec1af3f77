"""Roll a trained reach policy out in ``ReachEnv`` (``launch.eval_policy``), against a random policy.

The policy (EMA weights when the run kept them, ``use_ema``) runs as robot code runs it: a
:class:`~vla_foundry_jax.serving.Policy` with one session per episode (history of the agent position and the
previous command, as in the dataset), its first ``execute_steps`` commands of each chunk executed before
replanning (receding horizon); the episodes run in lockstep, the sessions that replan in one batch. A random policy
(uniform commands in the square) on the same episode seeds gives ``random_success_rate``. A PNG
(``plot``, default ``<run_dir>/eval_policy.png``) draws, for a few validation samples, the scene in world
coordinates with the expert's future commands and the predicted ones, beside the rollouts' paths coloured by
success or failure (axes, legends, a title). :func:`evaluate` returns every figure.
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
from vla_foundry_jax.errors import UsageError
from vla_foundry_jax.models.diffusion_policy import sample_actions
from vla_foundry_jax.serving import Execution, Policy
from vla_foundry_jax.testbeds.tiny_robotics import (
    ACTION_FIELD,
    CAMERA,
    FUTURE,
    PAST,
    PROPRIO_FIELD,
    ReachEnv,
)


def check_policy_run(run_dir: str) -> None:
    """A UsageError unless ``run_dir`` holds a diffusion_policy."""
    kind = ckpt_lib.load_experiment_params(run_dir).model.type
    if kind != "diffusion_policy":
        raise UsageError(f"{run_dir} holds a {kind!r} model, not a diffusion_policy.")


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


def robot_observation(obs: dict[str, Any]) -> dict[str, Any]:
    """A ``ReachEnv`` observation as a robot gives it to :class:`~vla_foundry_jax.serving.Policy`."""
    return {
        "images": {CAMERA: obs["image"]},
        "proprio": {PROPRIO_FIELD: obs["agent_xy"]},
        "instruction": obs["instruction"],
    }


def rollout(
    act: Callable[[list[int], list[dict[str, Any]]], list[np.ndarray]],
    *,
    num_episodes: int,
    seed: int = 0,
    max_steps: int = 24,
) -> dict[str, Any]:
    """Run ``num_episodes`` reach episodes (env seeds ``seed .. seed + n - 1``) in lockstep.

    ``act(episodes, observations) -> commands``: one command (raw units) per running episode and control step.
    Returns ``success_rate``, per-episode ``successes`` and ``steps``.
    """
    envs = [ReachEnv(max_steps=max_steps) for _ in range(num_episodes)]
    obs = [env.reset(seed + i) for i, env in enumerate(envs)]
    done, success = [False] * num_episodes, [False] * num_episodes
    steps = [0] * num_episodes
    paths = [[o["agent_xy"]] for o in obs]
    while not all(done):
        running = [i for i in range(num_episodes) if not done[i]]
        commands = act(running, [obs[i] for i in running])
        for i, command in zip(running, commands, strict=True):
            obs[i], done[i], success[i] = envs[i].step(np.asarray(command))
            paths[i].append(obs[i]["agent_xy"])
            steps[i] += 1
    return {
        "success_rate": float(np.mean(success)),
        "successes": success,
        "steps": steps,
        "paths": [np.stack(p) for p in paths],
        "targets": [env.setup.target for env in envs],
    }


def policy_actor(
    policy: Policy, *, num_episodes: int, seed: int, execute_steps: int
) -> Callable[[list[int], list[dict[str, Any]]], list[np.ndarray]]:
    """``act`` of :func:`rollout` through ``policy``: one session per episode (session seed = env seed), receding
    horizon of ``execute_steps``, the sessions that replan in one batch."""
    execution = Execution("receding", execute_steps=execute_steps)
    sessions = [policy.new_session(seed + i, execution) for i in range(num_episodes)]

    def act(episodes: list[int], observations: list[dict[str, Any]]) -> list[np.ndarray]:
        results = policy.step_batch([sessions[i] for i in episodes], [robot_observation(o) for o in observations])
        return [r.action[ACTION_FIELD] for r in results]

    return act


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


def prediction_figure(
    pixel_values: np.ndarray,
    true_actions: np.ndarray,
    pred_actions: np.ndarray,
    future_mask: np.ndarray,
    image_config: Any,
    *,
    rollouts: dict[str, Any] | None = None,
    title: str = "policy evaluation",
) -> Any:
    """A matplotlib figure: one panel per validation scene (drawn in world coordinates, x and y in [-1, 1]) with the
    expert's future commands and the predicted ones over the rows where ``future_mask`` holds, and, given
    ``rollouts`` (:func:`rollout`'s result), one panel of the rollout paths coloured by success or failure with their
    targets. ``pixel_values [k, H, W, 3]`` processor-normalised; actions ``[k, Ta, 2]`` in raw units."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean, std = np.asarray(image_config.mean), np.asarray(image_config.std)
    panels = len(pixel_values) + (rollouts is not None)
    fig = Figure(figsize=(3.4 * panels, 3.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    for i, (ax, img, true, pred, mask) in enumerate(
        zip(axes, pixel_values, true_actions, pred_actions, future_mask, strict=False)
    ):
        raw = np.clip(((img * std + mean) / image_config.rescale_factor).round(), 0, 255).astype(np.uint8)
        half = 1.0 / (raw.shape[0] - 1)  # pixel centres sit on the world square's edges (testbeds.to_pixels)
        ax.imshow(raw, extent=(-1 - half, 1 + half, -1 - half, 1 + half), interpolation="nearest")
        ax.plot(*true[mask].T, "-o", color="#ffd400", markersize=3, label="expert")
        ax.plot(*pred[mask].T, "-o", color="#f03cf0", markersize=3, label="predicted")
        err = float(np.linalg.norm(pred[mask] - true[mask], axis=-1).mean()) if mask.any() else float("nan")
        ax.set_title(f"validation sample {i}: error {err:.3f}", fontsize="medium")
        ax.set_xlim(-1 - half, 1 + half)  # commands outside the square are clipped by the environment anyway
        ax.set_ylim(-1 - half, 1 + half)
    if rollouts is not None:
        ax = axes[-1]
        ax.set_facecolor("0.96")
        for path, target, ok in zip(rollouts["paths"], rollouts["targets"], rollouts["successes"], strict=True):
            style = {"color": "tab:green", "ls": "-"} if ok else {"color": "tab:red", "ls": "--"}
            ax.plot(*np.asarray(path).T, **style, lw=1.2, label="success" if ok else "failure")
            ax.plot(*target, "*", color=style["color"], markersize=9)
            ax.plot(*path[0], ".", color="0.3")
        ax.plot([], [], "*", color="0.3", label="target")
        wins = int(sum(rollouts["successes"]))
        ax.set_title(f"rollouts: {wins}/{len(rollouts['successes'])} succeeded", fontsize="medium")
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal")
    for ax in axes:
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))  # one entry per kind
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize="small", framealpha=0.7)
    fig.suptitle(title)
    return fig


def draw_predictions(
    pixel_values: np.ndarray,
    true_actions: np.ndarray,
    pred_actions: np.ndarray,
    future_mask: np.ndarray,
    image_config: Any,
    path: str,
    *,
    rollouts: dict[str, Any] | None = None,
    title: str = "policy evaluation",
) -> str:
    """:func:`prediction_figure` saved as the PNG ``path`` (local, s3:// or gs://; written whole)."""
    fig = prediction_figure(
        pixel_values, true_actions, pred_actions, future_mask, image_config, rollouts=rollouts, title=title
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    paths.write_bytes(path, buffer.getvalue())  # beside a run on a store too
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
    if not 1 <= execute_steps <= FUTURE + 1:
        raise UsageError(f"execute_steps must be in [1, {FUTURE + 1}], got {execute_steps}.")
    check_policy_run(run_dir)
    policy = Policy.from_run(
        run_dir, num_flow_steps=num_inference_steps, use_ema=use_ema, seed=seed, batch_sizes=(num_episodes,)
    )
    exp = policy.exp
    check_reach_run(exp)
    act = policy_actor(policy, num_episodes=num_episodes, seed=seed, execute_steps=execute_steps)
    result = rollout(act, num_episodes=num_episodes, seed=seed, max_steps=max_steps)
    transform = policy.transform
    normalizer = transform.normalizer

    def predict_normalised(batch: dict[str, np.ndarray]) -> np.ndarray:
        key = jax.random.PRNGKey(seed)
        return np.asarray(sample_actions(policy.model, batch, key, num_inference_steps=num_inference_steps))

    out = {
        "success_rate": result["success_rate"],
        "random_success_rate": random_rollout(num_episodes=num_episodes, seed=seed, max_steps=max_steps),
        "num_episodes": num_episodes,
        "mean_steps": float(np.mean(result["steps"])),
    }
    val = list(exp.data.val_dataset_manifest)
    if val and all(paths.exists(m) for m in val) and num_plot_samples > 0:
        it = build_eval_iterator(exp.data, global_batch_size=num_plot_samples)
        batch = next(iter(it))
        pred = normalizer.denormalize_actions(predict_normalised(batch))
        true = normalizer.denormalize_actions(batch["actions"])
        mask = batch["future_mask"] & batch["valid"][:, None]
        err = np.linalg.norm(pred - true, axis=-1)[mask]
        out["val_action_error"] = float(err.mean())
        path = plot or paths.join(run_dir, "eval_policy.png")
        name = paths.basename(run_dir)
        out["plot"] = draw_predictions(
            batch["pixel_values"][:, 0],
            true,
            pred,
            mask,
            transform.processor.image_config,
            path,
            rollouts=result,
            title=f"{name}: expert vs predicted future commands on validation scenes; ReachEnv rollouts",
        )
    return out
