"""What the Hugging Face VLMs (PaliGemma, Idefics3 / SmolVLM) share: the per-sample image-token check and
the language-model call around their own ``embed``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.models.hf_decoder import HFDecoder
from vla_foundry_jax.models.hf_vision import HFVisionTower
from vla_foundry_jax.models.transformer import TransformerOutput
from vla_foundry_jax.models.vlm import check_image_token_counts, merge_image_tokens


def check_image_tokens(config: Any, input_ids: Any, pixel_values: Any) -> None:
    """Host-side check: each sample holds exactly ``images x config.tokens_per_image`` image tokens."""
    found = (np.asarray(input_ids) == config.image_token_id).sum(axis=-1)
    check_image_token_counts(found, pixel_values, config.image_token_id, config.tokens_per_image)


class HFVLM(nnx.Module):
    """Base of the HF VLM modules: subclasses set ``config`` (with ``image_token_id``, ``tokens_per_image`` and a
    ``text`` decoder config), the towers and the projector with :meth:`_build_towers`, and define
    ``encode_images(pixel_values)``."""

    def _build_towers(
        self,
        config: Any,
        *,
        projector_in: int,
        projector_bias: bool,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        remat_policy: str | None,
    ) -> Dense:
        """Sets ``config``, ``dtype``, ``vision_tower`` and ``language_model``; returns the image projector
        ``Dense(projector_in -> text hidden)`` (built between the two towers, the parameter-initialisation order)."""
        self.config = config
        self.dtype = dtype
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype, "remat_policy": remat_policy}
        self.vision_tower = HFVisionTower(config.vision, where="vlm_hf.vision_tower", **kw)
        projector = Dense(
            projector_in,
            config.text.hidden_size,
            bias=projector_bias,
            names=("mlp", "embed"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.language_model = HFDecoder(config.text, **kw)
        return projector

    def _lookup_ids(self, input_ids: jax.Array, is_img: jax.Array) -> jax.Array:
        """The ids looked up in the LM's embedding table (subclasses may remap the image positions)."""
        del is_img
        return input_ids

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
        """Token embeddings with the image positions replaced by image tokens (``encode_images``), ``[B, S, H]``."""
        is_img = input_ids == self.config.image_token_id
        tokens = self.language_model.embed(self._lookup_ids(input_ids, is_img))
        if pixel_values is None:
            return tokens
        images = self.encode_images(pixel_values).astype(tokens.dtype)
        return merge_image_tokens(tokens, images, is_img)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def hidden_dim(self) -> int:
        return self.config.text.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.text.num_layers

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        *,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Any = None,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
    ) -> TransformerOutput:
        """``input_ids [B, S]`` with image tokens -> LM output (causal; prefix-LM where ``token_type_ids == 0``)."""
        del deterministic  # no dropout
        if not isinstance(input_ids, jax.core.Tracer) and not isinstance(pixel_values, jax.core.Tracer):
            check_image_tokens(self.config, input_ids, pixel_values)
        return self.language_model(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            cache=cache,
            output_hidden_states=output_hidden_states,
            prefix_mask=None if token_type_ids is None else token_type_ids == 0,
            position_ids=position_ids,
        )

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> Any:
        return self.language_model.init_cache(batch_size, max_len, dtype)
