"""Shared attributes resolved once, before building: the one place where params read from each other.

The original does this in ``init_shared_attributes`` spread over the param classes; here it is one
function from an experiment to a completed experiment.
"""

from __future__ import annotations

from vla_foundry_jax.params.base import ParamsError
from vla_foundry_jax.params.train_params import TrainExperimentParams


def resolve_experiment(exp: TrainExperimentParams) -> TrainExperimentParams:
    """Fill derived fields (data seed from hparams) and check the model against the data's vocabulary."""
    if exp.model is None:
        raise ParamsError("experiment.model is not set; bind it in gin, e.g. `experiment.model = @transformer()`.")
    if exp.data is None:
        raise ParamsError("experiment.data is not set; bind it in gin, e.g. `experiment.data = @text_untokenized()`.")
    if not exp.data.dataset_manifest:
        raise ParamsError(f"{exp.data.gin_name}.dataset_manifest is empty; list at least one manifest.jsonl path.")
    if exp.total_train_samples is None:
        raise ParamsError(
            "experiment.total_train_samples is not set; it fixes the run's length (steps = samples / batch)."
        )
    data = exp.data.replace(seed=exp.hparams.seed)
    model = exp.model
    if data.type == "text_untokenized" and model.type == "transformer":
        from vla_foundry_jax.data.text import tokenizer_info

        vocab_len, _ = tokenizer_info(data)
        if model.vocab_size < vocab_len:
            raise ParamsError(
                f"transformer.vocab_size = {model.vocab_size} is smaller than the tokenizer {data.tokenizer!r} "
                f"({vocab_len} tokens with its pad token); set transformer.vocab_size >= {vocab_len}."
            )
    return exp.replace(data=data, model=model)
