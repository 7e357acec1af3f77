"""Rebuild a trained model from its checkpoint (params JSON + Orbax weights), with its EMA weights on request."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import paths
from vla_foundry_jax.models import build_model
from vla_foundry_jax.params import TrainExperimentParams
from vla_foundry_jax.training.ema import select_ema
from vla_foundry_jax.training.run_data import localize_experiment, run_dir_of
from vla_foundry_jax.training.state import model_kwargs


def load_run_model(path: str, *, use_ema: bool = False) -> tuple[nnx.Module, TrainExperimentParams, bool]:
    """``(model, experiment params, used_ema)`` saved under ``path`` (run, checkpoints or step directory), built
    from its stored params; with ``use_ema`` the trainable weights are the EMA copy when the run kept one.

    No gin file is needed: the experiment params JSON inside the checkpoint says what to build. The returned params
    read the data files (stats, processor, source VLM params) from the run's own copies when it has them
    (:mod:`~vla_foundry_jax.training.run_data`), so a run copied elsewhere with its dataset deleted still loads.
    """
    exp = localize_experiment(ckpt_lib.load_experiment_params(path), run_dir_of(path))
    model = nnx.eval_shape(
        lambda: build_model(exp.model, rngs=nnx.Rngs(0), load_weights=False, **model_kwargs(exp.hparams))
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
    (params,) = ckpt_lib.restore_model_weights(path, [params])
    ema = restore_ema_params(ckpt_lib.resolve_step_dir(path), params) if use_ema else None
    return nnx.merge(graphdef, select_ema(params, ema), rest), exp, ema is not None


def load_model(path: str) -> tuple[nnx.Module, TrainExperimentParams]:
    """The model saved under ``path`` with its trained (not EMA) weights, and its experiment params."""
    model, exp, _ = load_run_model(path)
    return model, exp


def restore_ema_params(step_dir: str, params: Any) -> Any | None:
    """The EMA stored in ``<step_dir>/train`` as a tree like ``params`` (trainable parameters; float32, as kept in
    training: :func:`~vla_foundry_jax.training.ema.select_ema` casts it), or None when the run kept no EMA."""
    path = paths.join(ckpt_lib.readable_step_dir(step_dir), "train")
    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    ema = dict(tree).get("ema")
    if not ema:
        return None
    flat = ckpt_lib.flatten_dict(dict(ema))
    wanted = ckpt_lib.flat_params(params)
    flat = {k: v for k, v in flat.items() if k.endswith(".value") or k in wanted}
    names = {(k[: -len(".value")] if k.endswith(".value") else k): k for k in flat}
    missing = sorted(set(names) - set(wanted))
    if missing:
        raise ValueError(f"EMA weights in {path} name parameters the model lacks: {missing[:10]}")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"ema": {}}
    for name, key in names.items():
        node = target["ema"]
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        v = wanted[name]
        node[parts[-1]] = jax.ShapeDtypeStruct(tuple(v.shape), np.float32, sharding=sharding)
    restored = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        ),
    )

    values = ckpt_lib.flatten_dict(restored["ema"])
    return ckpt_lib.set_flat_params(params, {n: values[k] for n, k in names.items()})
