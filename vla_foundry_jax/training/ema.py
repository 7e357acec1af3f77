"""EMA of the trainable weights (reference §3.12): ``vanilla`` (fixed alpha) and ``ema`` (adaptive).

Pure functions over parameter pytrees, applied inside the jitted step after the optimizer update.
The EMA copy is float32 whatever the parameter dtype; :func:`select_ema` is the one place that picks the EMA
(or the raw weights) for inference and casts it back to the parameters' dtypes, and :func:`model_from_state`
rebuilds a model from a train state with it (``TrainResult.model``, ``sampling.load_run_model``).
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


def select_ema(params: Any, ema: Any, *, use_ema: bool = True) -> Any:
    """The trainable weights a model runs with: ``ema`` when ``use_ema`` and the run kept one (``ema`` neither
    None nor empty), each leaf cast to the dtype of the parameter it averages (the EMA is float32, a ``pure_bf16``
    run's parameters bfloat16); else ``params`` unchanged. ``ema`` has ``params``' tree structure."""
    if not use_ema or ema is None or not jax.tree.leaves(ema):
        return params
    return jax.tree.map(lambda e, p: jnp.asarray(e).astype(p.dtype), ema, params)


def model_from_state(spec: Any, state: dict[str, Any], *, use_ema: bool = True) -> Any:
    """The model of a train state for inference (``spec``: its ``training.state.ModelSpec``): :func:`select_ema`
    of ``state["params"]`` / ``state["ema"]`` merged with the frozen weights and the rest of the state."""
    params = select_ema(state["params"], state.get("ema"), use_ema=use_ema)
    return spec.merge(params, state["frozen"], state["rest"])
