"""Loss building blocks: cross-entropy with z-loss and masked MSE (reference §3.9), and the language-model loss
shared by every causal LM type."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vla_foundry_jax.params import HyperParams


def cross_entropy_with_z_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, z_loss_coefficient: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean CE over unmasked targets + ``z * mean(logsumexp(logits)^2)`` over ALL positions, in float32.

    logits ``[..., V]``, targets ``[...]`` int, mask ``[...]`` (True = counted). As in the original, the
    z-term includes masked positions; with every target masked the CE term is 0.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = lse - target_logit
    weights = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    count = jnp.sum(weights)
    ce = jnp.sum(nll * weights) / jnp.maximum(count, 1.0)
    loss = ce
    metrics = {"ce_loss": ce, "num_tokens": count}
    if z_loss_coefficient:
        z = z_loss_coefficient * jnp.mean(lse**2)
        loss = loss + z
        metrics["z_loss"] = z
    return loss, metrics


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``sum(mask * (pred - target)^2) / sum(mask)`` with the mask broadcast over trailing features.

    The mask has the input's shape or the input's shape minus the last dim; an all-zero mask gives 0.
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if mask is None:
        return jnp.mean(err)
    mask = mask.astype(jnp.float32)
    if mask.ndim == err.ndim - 1:
        mask = mask[..., None]
    mask = jnp.broadcast_to(mask, err.shape)
    return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(
    model: Any, batch: dict[str, jax.Array], *, hparams: HyperParams, rng: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Language modelling: predict ``input_ids[:, 1:]`` from ``input_ids[:, :-1]``.

    ``batch["input_ids"]`` is ``[b, seq_len + 1]``; ``batch["loss_mask"]`` (optional, same shape) is True
    on real tokens, and a target is counted when it is real (the original masks ``targets == pad``).
    """
    ids = batch["input_ids"]
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = batch["loss_mask"][:, 1:] if "loss_mask" in batch else None
    logits = model(inputs).logits
    if hparams.loss_function == "mse":
        raise ValueError("hparams.loss_function = 'mse' cannot train a language model; use 'cross_entropy'.")
    return cross_entropy_with_z_loss(logits, targets, mask, hparams.z_loss_coefficient)
