"""The train state: a pytree of trainable / frozen parameters, optimizer state, EMA, step and RNG.

The model's graph (``nnx.GraphDef``) stays outside the state; inside the jitted step the module is
rebuilt with ``nnx.merge``. Parameters of sub-models whose params say ``freeze=True`` live in
``frozen``: they get no gradient and the optimizer holds no state for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from vla_foundry_jax import parallel
from vla_foundry_jax.models import build_model
from vla_foundry_jax.params import HyperParams, ModelParams, submodel_params
from vla_foundry_jax.registry import model_record
from vla_foundry_jax.training.ema import ema_init


def frozen_prefixes(params: ModelParams, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Module paths (attribute names) of every sub-model whose params set ``freeze=True``.

    Convention: a sub-model lives at the attribute named like its params field (``vlm.vit`` -> ``model.vit``).
    A model type may also freeze module paths by its own flags (``registry.register_frozen_paths``, e.g.
    CLIP's ``freeze_text_encoder`` -> ``("text_model",)``).
    """
    if params.freeze:
        return [prefix]
    hook = model_record(params.type).frozen_paths
    out = [(*prefix, *path) for path in hook(params)] if hook else []
    for name, child in submodel_params(params).items():
        out += frozen_prefixes(child, (*prefix, name))
    return out


def _path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def trainable_filter(params: ModelParams) -> Any:
    """An NNX filter selecting the ``nnx.Param``s outside every frozen sub-model."""
    frozen = frozen_prefixes(params)

    def is_trainable(path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        keys = _path_keys(path)
        return not any(keys[: len(f)] == f for f in frozen)

    return is_trainable


def model_kwargs(hparams: HyperParams) -> dict[str, Any]:
    return {
        "dtype": jnp.dtype(hparams.compute_dtype),
        "param_dtype": jnp.dtype(hparams.param_dtype),
        "remat_policy": hparams.remat_policy if hparams.grad_checkpointing else None,
    }


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What is static about a model in training: its graph, split filters and shardings."""

    params: ModelParams
    graphdef: Any
    filters: tuple[Any, ...]  # (trainable, frozen params, everything else)
    abstract: tuple[Any, ...]  # abstract (trainable, frozen, rest) states
    shardings: tuple[Any, ...]  # their NamedShardings, from the logical axis names
    mesh: Mesh

    def merge(self, trainable: Any, frozen: Any, rest: Any) -> nnx.Module:
        # Rebuild the Variables of every part at the current trace level (inside jax.grad the frozen and
        # non-parameter parts would otherwise keep Variables of the outer jit trace, which NNX rejects).
        trainable, frozen, rest = jax.tree.map(lambda x: x, (trainable, frozen, rest))
        return nnx.merge(self.graphdef, trainable, frozen, rest)


def make_model_spec(params: ModelParams, hparams: HyperParams, mesh: Mesh) -> ModelSpec:
    """Trace the model abstractly (no memory) to get its graph and per-parameter shardings."""
    kwargs = model_kwargs(hparams)
    filters = (trainable_filter(params), nnx.Param, ...)
    abstract_model = nnx.eval_shape(lambda: build_model(params, rngs=nnx.Rngs(0), load_weights=False, **kwargs))
    graphdef, *states = nnx.split(abstract_model, *filters)
    shardings = tuple(parallel.state_shardings(s, mesh) for s in states)
    return ModelSpec(params, graphdef, filters, tuple(states), shardings, mesh)


def init_model_states(spec: ModelSpec, hparams: HyperParams, seed: int) -> tuple[Any, Any, Any]:
    """Initialise (trainable, frozen, rest) directly in their shardings (no full copy on one device)."""
    kwargs = model_kwargs(hparams)

    def init() -> tuple[Any, ...]:
        model = build_model(spec.params, rngs=nnx.Rngs(seed), load_weights=False, **kwargs)
        return tuple(nnx.split(model, *spec.filters)[1:])

    return jax.jit(init, out_shardings=spec.shardings)()


def init_train_state(
    spec: ModelSpec,
    optimizer: optax.GradientTransformation,
    hparams: HyperParams,
    *,
    use_ema: bool,
    model_states: tuple[Any, Any, Any] | None = None,
) -> dict[str, Any]:
    """A fresh train state; ``model_states`` (trainable, frozen, rest) replaces the random init."""
    trainable, frozen, rest = model_states or init_model_states(spec, hparams, hparams.seed)
    rep = parallel.replicated(spec.mesh)
    # Moments take their parameter's sharding; counters and other scalars are replicated.
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, p: p.sharding,
        jax.eval_shape(optimizer.init, trainable),
        trainable,
        transform_non_params=lambda _: rep,
    )
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
    return {
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "params": trainable,
        "frozen": frozen,
        "rest": rest,
        "opt_state": opt_state,
        "ema": jax.jit(ema_init)(trainable) if use_ema else None,
        "rng": jax.device_put(jax.random.PRNGKey(hparams.seed), rep),
    }


def abstract_train_state(state: dict[str, Any]) -> Any:
    """ShapeDtypeStructs with shardings for every leaf of ``state`` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def count_params(state: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))
