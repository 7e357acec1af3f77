"""EMA of the trainable weights (reference §3.12): ``vanilla`` (fixed alpha) and ``ema`` (adaptive).

Pure functions over parameter pytrees, applied inside the jitted step after the optimizer update.
The EMA copy is float32 whatever the parameter dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vla_foundry_jax.params import EMAParams


def ema_init(params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_decay(ema: EMAParams, num_updates: jax.Array) -> jax.Array:
    """Decay for the update that follows ``num_updates`` earlier ones.

    ``vanilla``: the first update copies, then ``alpha``. ``ema`` (diffusers-style):
    ``k = max(0, n - update_after_step - 1)``, decay 0 when ``k == 0`` else
    ``clip(1 - (1 + k / inv_gamma) ** -power, min_value, max_value)``.
    """
    n = jnp.asarray(num_updates, jnp.float32)
    if ema.type == "vanilla":
        return jnp.where(n == 0, 0.0, ema.alpha)
    k = jnp.maximum(0.0, n - ema.update_after_step - 1)
    value = jnp.clip(1.0 - (1.0 + k / ema.inv_gamma) ** (-ema.power), ema.min_value, ema.max_value)
    return jnp.where(k == 0, 0.0, value)


def ema_update(ema: EMAParams, ema_params: Any, params: Any, num_updates: jax.Array) -> Any:
    decay = ema_decay(ema, num_updates)
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema_params, params)
