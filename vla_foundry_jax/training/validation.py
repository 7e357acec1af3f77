"""Validation during training (reference §5.5): the held-out loss every ``val_every_n_checkpoints`` checkpoints.

``experiment.total_val_samples`` samples of ``data.val_dataset_manifest`` (read in order, centred crops, no
augmentation; rounded up to whole global batches) are scored with the model's own loss, without gradients, with a
fixed random key so that successive validations compare the same noise draws. Each batch's mean loss is weighted by
its number of real (non-padding) samples, as the original weights by batch size. A model type whose record has
``eval_metrics`` adds its own held-out figures (a policy's sampled-action error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vla_foundry_jax import parallel
from vla_foundry_jax.data.pipeline import build_eval_iterator
from vla_foundry_jax.params import ParamsError, TrainExperimentParams
from vla_foundry_jax.registry import model_record
from vla_foundry_jax.training.state import ModelSpec


class Validator:
    """Scores a train state on the held-out samples; call it with the state, get ``{"val_loss": ...}``."""

    def __init__(self, exp: TrainExperimentParams, spec: ModelSpec, loss_fn: Callable[..., Any], mesh: Mesh) -> None:
        hp = exp.hparams
        self.every = exp.val_every_n_checkpoints
        self.mesh = mesh
        self.iterator = build_eval_iterator(
            exp.data,
            global_batch_size=hp.global_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        available = self.iterator.num_samples
        if exp.total_val_samples > available:
            raise ParamsError(
                f"experiment.total_val_samples = {exp.total_val_samples} but {exp.data.gin_name}.val_dataset_manifest "
                f"holds {available} samples; lower total_val_samples to at most {available}."
            )
        self.num_batches = -(-exp.total_val_samples // hp.global_batch_size)
        self.key = jax.random.PRNGKey(hp.seed + 1)
        self.eval_metrics = model_record(exp.model.type).eval_metrics

        def batch_metrics(state: dict[str, Any], batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, Any]:
            model = spec.merge(state["params"], state["frozen"], state["rest"])
            out = {"val_loss": loss_fn(model, batch, hparams=hp, rng=rng)[0]}
            if self.eval_metrics is not None:
                out.update(self.eval_metrics(model, batch, rng))
            return out

        self._batch_metrics = jax.jit(batch_metrics)

    def due(self, checkpoint_index: int) -> bool:
        """Whether validation runs after the ``checkpoint_index``-th checkpoint (1-based) of the run."""
        return checkpoint_index % self.every == 0

    def __call__(self, state: dict[str, Any]) -> dict[str, float]:
        sums: dict[str, float] = {}
        seen = 0
        for i, host_batch in zip(range(self.num_batches), self.iterator, strict=False):
            valid = host_batch.pop("valid")
            weight = float(np.sum(jax.device_get(multihost_utils.process_allgather(valid))))
            batch = parallel.host_batch_to_global(host_batch, self.mesh)
            metrics = jax.device_get(self._batch_metrics(state, batch, jax.random.fold_in(self.key, i)))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
            seen += weight
        out = {k: v / max(seen, 1.0) for k, v in sums.items()}
        out["val_samples"] = seen
        return out


def make_validator(
    exp: TrainExperimentParams, spec: ModelSpec, loss_fn: Callable[..., Any], mesh: Mesh
) -> Validator | None:
    """The run's validator, or None when ``experiment.total_val_samples`` is unset (no validation)."""
    if exp.total_val_samples is None:
        return None
    if not exp.data.val_dataset_manifest:
        raise ParamsError(
            f"experiment.total_val_samples = {exp.total_val_samples} needs held-out data: set "
            f"{exp.data.gin_name}.val_dataset_manifest (or unset total_val_samples)."
        )
    return Validator(exp, spec, loss_fn, mesh)
