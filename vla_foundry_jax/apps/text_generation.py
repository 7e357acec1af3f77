"""Text continuations of a trained language model (``launch.generate``, the sample after ``launch.train``)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vla_foundry_jax import paths
from vla_foundry_jax.errors import UsageError
from vla_foundry_jax.models.generation import generate
from vla_foundry_jax.params import TrainExperimentParams
from vla_foundry_jax.sampling import load_model


def prompt_tokenizer(exp: TrainExperimentParams) -> Any:
    """The run's tokenizer (``data.tokenizer``), loaded with ``transformers.AutoTokenizer``."""
    from transformers import AutoTokenizer

    name = getattr(exp.data, "tokenizer", None)
    if not name:
        raise UsageError(f"data type {exp.data.type!r} names no tokenizer; cannot turn a prompt into token ids.")
    return AutoTokenizer.from_pretrained(paths.local_dir(name) if paths.is_remote(name) else name)


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
    """Continue ``prompt``; temperature 0 is greedy.

    ``model_or_result``: a run directory (or checkpoints/<step>; its trained weights), a ``TrainResult``, or a
    model (then ``exp`` gives the tokenizer).
    """
    if isinstance(model_or_result, (str, os.PathLike)):
        model, exp = load_model(os.fspath(model_or_result))
    elif hasattr(model_or_result, "spec"):
        exp = model_or_result.experiment
        model = model_or_result.model()
    else:
        model = model_or_result
    tok = prompt_tokenizer(exp)
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
