"""One optimizer step as a single jitted function with the state donated.

Gradient accumulation runs inside the step as a ``lax.scan`` over micro-batches and averages the
per-micro-batch mean losses and gradients (the original's semantics). Micro-batch ``k`` takes the
global rows ``k, k + accum, k + 2 accum, ...`` so that every device holds its share of every
micro-batch and no data moves between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vla_foundry_jax import parallel
from vla_foundry_jax.params import EMAParams, HyperParams
from vla_foundry_jax.training.ema import ema_update
from vla_foundry_jax.training.optimizer import lr_schedule
from vla_foundry_jax.training.state import ModelSpec


def split_micro_batches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """``[accum * micro, ...]`` -> ``[accum, micro, ...]`` with micro-batch k = rows k::accum."""

    def one(x: jax.Array) -> jax.Array:
        micro = x.shape[0] // accum
        return jnp.swapaxes(x.reshape(micro, accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def make_train_step(
    spec: ModelSpec,
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    optimizer: optax.GradientTransformation,
    hparams: HyperParams,
    ema: EMAParams,
    *,
    accum_steps: int,
    total_steps: int,
    state_shardings: Any,
) -> Callable[[dict[str, Any], dict[str, jax.Array]], tuple[dict[str, Any], dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``; ``batch`` holds the global batch."""
    schedule = lr_schedule(hparams, total_steps)
    mesh = spec.mesh

    def loss_of(trainable: Any, frozen: Any, rest: Any, batch: dict[str, jax.Array], rng: jax.Array) -> Any:
        model = spec.merge(trainable, frozen, rest)
        return loss_fn(model, batch, hparams=hparams, rng=rng)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, Any]]:
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        params, frozen, rest = state["params"], state["frozen"], state["rest"]
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(params, frozen, rest, batch, rng)
        else:
            micro = split_micro_batches(batch, accum_steps)
            micro = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))
                ),
                micro,
            )

            def body(carry: Any, xs: Any) -> Any:
                mb, i = xs
                (loss_i, metrics_i), grads_i = grad_fn(params, frozen, rest, mb, jax.random.fold_in(rng, i))
                acc = jax.tree.map(jnp.add, carry, (loss_i, metrics_i, grads_i))
                return acc, None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, frozen, rest, first, rng))
            (loss, metrics), grads = zeros
            (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), (micro, jnp.arange(accum_steps)))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
        grad_norm = optax.global_norm(grads)
        # The non-finite guard: a step whose loss or gradient norm is not finite leaves the weights, the optimizer
        # state (its step count included) and the EMA as they were. ``lax.cond`` runs the update only on finite
        # steps, so a normal step costs nothing extra (a ``jnp.where`` over the trees measured +17% bytes accessed).
        # ``step`` still advances: it counts consumed batches, which the data position and the checkpoints follow.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands: Any) -> Any:
            params, opt_state, ema_params = operands
            updates, opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if ema_params is not None:
                ema_params = ema_update(ema, ema_params, new_params, step)
            return new_params, opt_state, ema_params

        params, opt_state, ema_params = jax.lax.cond(
            finite, update, lambda operands: operands, (params, state["opt_state"], state["ema"])
        )
        new_state = dict(state, step=step + 1, params=params, opt_state=opt_state, ema=ema_params)
        out = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(step),
            "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
            **metrics,
        }
        return new_state, out

    batch_shard = parallel.batch_sharding(mesh, 1)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shard),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
