"""A test-only model type: a transformer inside a wrapper, for nested resume and freeze tests."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.layers.losses import next_token_loss
from vla_foundry_jax.params import ModelParams, TransformerParams, register_params
from vla_foundry_jax.registry import PARAMS, ModelRecord, build_module, register_model

if "test_wrapper" not in PARAMS:

    @register_params("test_wrapper")
    class WrapperParams(ModelParams):
        transformer: TransformerParams = dataclasses.field(default_factory=TransformerParams)

    class Wrapper(nnx.Module):
        """logits = transformer logits + a learned per-token bias."""

        def __init__(self, params, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, remat_policy=None):
            self.transformer = build_module(
                params.transformer, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy
            )
            self.bias = nnx.Param(jnp.zeros((params.transformer.vocab_size,), param_dtype))

        def __call__(self, input_ids):
            out = self.transformer(input_ids)
            return dataclasses.replace(out, logits=out.logits + self.bias[...])

    register_model(ModelRecord(params=WrapperParams, builder=Wrapper, loss=next_token_loss))

WrapperParams = PARAMS["test_wrapper"]
