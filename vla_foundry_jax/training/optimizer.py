"""AdamW with the original's learning-rate schedules and weight-decay groups (optax)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from vla_foundry_jax.params import HyperParams


def parse_steps(value: str, total_steps: int) -> int:
    """The original's warmup/decay convention: a value < 1 is a fraction of the total steps, else steps."""
    v = float(value)
    return int(v * total_steps) if v < 1 else int(v)


def lr_schedule(hparams: HyperParams, total_steps: int) -> optax.Schedule:
    """lr as a pure function of the number of completed steps (reference §5.4).

    Warmup ``base * (step + 1) / W`` for ``step < W``; then ``cosine`` to ``lr_cooldown_end`` at
    ``total_steps`` (floored at ``force_min_lr``), ``const``, or ``warmup_constant_decay`` (constant, then
    a cosine over the last ``decay`` steps).
    """
    base, min_lr = hparams.lr, hparams.lr_cooldown_end
    warmup = parse_steps(hparams.warmup, total_steps)
    decay = parse_steps(hparams.decay, total_steps)
    kind, force_min = hparams.lr_scheduler, hparams.force_min_lr

    def cosine(progress: jax.Array) -> jax.Array:
        return min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (base - min_lr)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = base * (step + 1.0) / max(warmup, 1)
        if kind == "cosine":
            after = cosine((step - warmup) / max(total_steps - warmup, 1))
            after = jnp.maximum(after, force_min)
        elif kind == "const":
            after = jnp.asarray(base, jnp.float32)
        else:  # warmup_constant_decay
            start = total_steps - decay
            after = jnp.where(step < start, base, cosine((step - start) / max(decay, 1)))
        return jnp.where(step < warmup, warm, after)

    return schedule


def path_name(path: tuple[Any, ...]) -> str:
    """Dotted name of a pytree path, keeping dict keys and sequence indices (not ``.value`` attributes)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
    return ".".join(parts)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: the original exempts names ending in ``bias`` or containing ``norm``."""

    def one(path: tuple[Any, ...], _: Any) -> bool:
        name = path_name(path).lower()
        return not (name.endswith("bias") or "norm" in name)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(hparams: HyperParams, total_steps: int) -> optax.GradientTransformation:
    """Optional global-norm clipping, then AdamW (decoupled decay, bias correction, eps outside the sqrt)."""
    chain = []
    if hparams.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(hparams.grad_clip_norm))
    chain.append(
        optax.adamw(
            learning_rate=lr_schedule(hparams, total_steps),
            b1=hparams.beta1,
            b2=hparams.beta2,
            eps=hparams.eps,
            weight_decay=hparams.wd,
            mask=decay_mask,
        )
    )
    return optax.chain(*chain)
