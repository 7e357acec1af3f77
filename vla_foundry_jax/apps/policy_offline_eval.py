"""Offline evaluation of a trained ``diffusion_policy`` on held-out robotics data (any dataset, e.g. a converted
LeRobot one): ``launch.eval_policy_offline``.

For every validation sample (``robotics.val_dataset_manifest`` of the run, or ``manifests``) the policy samples an
action window (``sample_actions``, ``num_inference_steps`` denoising steps, the known past actions re-imposed);
predictions and targets are mapped back to raw units with the run's statistics. Reported over the future rows
(``future_mask``) of real samples: ``val_action_error`` (mean Euclidean distance between predicted and recorded
action vectors), ``val_action_mae`` (mean absolute error per action feature), ``val_action_error_first`` (the
distance at the current step only, the command a controller executes first), ``num_samples``, ``used_ema``.
No simulator is needed; for the bundled reach task ``launch.eval_policy`` also rolls the policy out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_foundry_jax.data.pipeline import build_eval_iterator
from vla_foundry_jax.data.robotics import robotics_transform
from vla_foundry_jax.data.shards import DataError
from vla_foundry_jax.sampling import load_run_model


def offline_action_error(
    run_dir: str,
    *,
    manifests: Sequence[str] | None = None,
    batch_size: int = 32,
    max_batches: int | None = None,
    num_inference_steps: int | None = 10,
    use_ema: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The figures of the module docstring for the run at ``run_dir``."""
    import jax

    from vla_foundry_jax.models.diffusion_policy import action_sampler

    model, exp, used_ema = load_run_model(run_dir, use_ema=use_ema)
    if exp.model.type != "diffusion_policy" or exp.data.type != "robotics":
        raise DataError(
            f"{run_dir} holds a {exp.model.type!r} model on {exp.data.type!r} data; offline policy evaluation needs a "
            "diffusion_policy trained on robotics data."
        )
    manifests = list(manifests) if manifests else list(exp.data.val_dataset_manifest)
    if not manifests:
        raise DataError(
            f"{run_dir}: the run has no robotics.val_dataset_manifest; pass --manifests=DIR/val/manifest.jsonl."
        )
    transform = robotics_transform(exp.data, train=False)
    normalizer, first = transform.normalizer, transform.past  # row of the current step in the action window
    sample = action_sampler(model, num_inference_steps=num_inference_steps)  # one compile for the fixed batch shape
    key = jax.random.PRNGKey(seed)
    dist, dist_first, abs_err, n_rows, n_first, n_samples = 0.0, 0.0, None, 0, 0, 0
    for i, batch in enumerate(build_eval_iterator(exp.data, manifests, global_batch_size=batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        key, sub = jax.random.split(key)
        pred = normalizer.denormalize_actions(np.asarray(sample(batch, sub)))
        true = normalizer.denormalize_actions(np.asarray(batch["actions"]))
        valid = np.asarray(batch["valid"], bool)
        mask = np.asarray(batch["future_mask"], bool) & valid[:, None]
        diff = pred - true
        dist += float(np.linalg.norm(diff, axis=-1)[mask].sum())
        abs_err = np.abs(diff)[mask].sum(0) if abs_err is None else abs_err + np.abs(diff)[mask].sum(0)
        n_rows += int(mask.sum())
        sel = mask[:, first]
        dist_first += float(np.linalg.norm(diff[:, first], axis=-1)[sel].sum())
        n_first += int(sel.sum())
        n_samples += int(valid.sum())
    if n_rows == 0:
        raise DataError(f"no future action rows in {manifests}; nothing to evaluate.")
    return {
        "val_action_error": dist / n_rows,
        "val_action_error_first": dist_first / max(n_first, 1),
        "val_action_mae": (abs_err / n_rows).tolist(),
        "num_samples": n_samples,
        "num_future_rows": n_rows,
        "used_ema": bool(used_ema),
        "manifests": manifests,
    }
