"""``build_model``: the model its params describe, with the weights they name.

The one path from params to a usable model. Training, sampling and applications all go through
``load_weights`` (training applies it to sharded states it initialised itself; ``build_model`` to a model
built on the spot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import logging
from flax import nnx

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.params import ModelParams, submodel_params
from vla_foundry_jax.registry import build_module, model_record


def submodels(params: ModelParams, prefix: str = "") -> list[tuple[str, ModelParams]]:
    """(module path prefix, params) of ``params`` and every nested sub-model, parents first."""
    out = [(prefix, params)]
    for name, child in submodel_params(params).items():
        out += submodels(child, f"{prefix}{name}.")
    return out


def resume_weights(params: ModelParams, states: Sequence[Any], prefix: str) -> list[Any]:
    """Weights-only ``resume_from_checkpoint`` of one (sub-)model at ``prefix``: its record's resume loader
    when it has one (a run of another type), else the same-type weights of that run (token tables may grow)."""
    resume_loader = model_record(params.type).resume_loader
    if resume_loader is not None:
        return list(resume_loader(params, states, prefix))
    where = prefix[:-1] or params.gin_name
    stored = ckpt_lib.load_experiment_params(params.resume_from_checkpoint).model
    if stored.type != params.type:
        raise ckpt_lib.CheckpointError(
            f"{where}.resume_from_checkpoint = {params.resume_from_checkpoint!r} holds a {stored.type!r} "
            f"model but {where} is a {params.type!r}."
        )
    logging.info("loading %s weights from %s", where, params.resume_from_checkpoint)
    return ckpt_lib.restore_model_weights(params.resume_from_checkpoint, states, target_prefix=prefix, grow_vocab=True)


def load_weights(params: ModelParams, states: Sequence[Any], *, top_level_resume: bool = True) -> list[Any]:
    """Fill the ``nnx.State`` parts of a model built from ``params`` with the weights its params name.

    First every (sub-)model's record weight loader (``hf_pretrained``, ``pretrained``), parents first; then
    every weights-only ``resume_from_checkpoint``. ``top_level_resume=False`` leaves the top-level
    ``resume_from_checkpoint`` to the caller (training restores the full train state from it).
    """
    states = list(states)
    for path, child in submodels(params):
        loader = model_record(child.type).weight_loader
        if loader is not None:
            states = list(loader(child, states, path))
    for path, child in submodels(params):
        if child.resume_from_checkpoint and (path or top_level_resume):
            states = resume_weights(child, states, path)
    return states


def build_model(params: ModelParams, *, rngs: nnx.Rngs, load_weights: bool = True, **kwargs: Any) -> nnx.Module:
    """The NNX module ``params`` describe (``kwargs``: dtype, param_dtype, remat_policy).

    With ``load_weights`` (the default) it holds the weights its params name, for the model and every
    sub-model, exactly as training starts from; ``load_weights=False`` keeps the random initialisation (for
    abstract tracing under ``nnx.eval_shape`` or ``jax.jit``).
    """
    model = build_module(params, rngs=rngs, **kwargs)
    if load_weights:
        graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
        (weights,) = _load(params, [weights])
        model = nnx.merge(graphdef, weights, rest)
    return model


_load = load_weights
