"""Rebuild a trained model from its checkpoint (params JSON + Orbax weights) and sample text from it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.params import TrainExperimentParams
from vla_foundry_jax.registry import build_model
from vla_foundry_jax.training.state import model_kwargs


def load_model(path: str) -> tuple[nnx.Module, TrainExperimentParams]:
    """The model saved under ``path`` (run, checkpoints or step directory), built from its stored params.

    No gin file is needed: the experiment params JSON inside the checkpoint says what to build.
    """
    exp = ckpt_lib.load_experiment_params(path)
    model = nnx.eval_shape(lambda: build_model(exp.model, rngs=nnx.Rngs(0), **model_kwargs(exp.hparams)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
    (params,) = ckpt_lib.restore_model_weights(path, [params])
    return nnx.merge(graphdef, params, rest), exp


def _tokenizer(exp: TrainExperimentParams) -> Any:
    from transformers import AutoTokenizer

    name = getattr(exp.data, "tokenizer", None)
    if not name:
        raise ValueError(f"data type {exp.data.type!r} names no tokenizer; cannot turn a prompt into token ids.")
    return AutoTokenizer.from_pretrained(name)


def sample_text(
    model_or_result: Any,
    prompt: str,
    *,
    exp: TrainExperimentParams | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 50,
    top_p: float = 0.9,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` with the model (a module, or a ``TrainResult``); temperature 0 is greedy."""
    from vla_foundry_jax.models.generation import generate

    if hasattr(model_or_result, "spec"):
        exp = model_or_result.experiment
        model = model_or_result.model()
    else:
        model = model_or_result
    tok = _tokenizer(exp)
    ids = np.asarray([tok(prompt)["input_ids"]], np.int32)
    out = generate(
        model,
        jnp.asarray(ids),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=tok.eos_token_id,
        rng=jax.random.PRNGKey(seed),
    )
    return tok.decode(np.asarray(out)[0, ids.shape[1] :], skip_special_tokens=True)
