"""What the Hugging Face VLMs (PaliGemma, Idefics3 / SmolVLM) share: the per-sample image-token check and
the language-model call around their own ``embed``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.models.transformer import TransformerOutput
from vla_foundry_jax.models.vlm import ImageTokenError


def check_image_tokens(config: Any, input_ids: Any, pixel_values: Any) -> None:
    """Host-side check: each sample holds exactly ``images x config.tokens_per_image`` image tokens."""
    found = (np.asarray(input_ids) == config.image_token_id).sum(axis=-1)
    n_images = 0 if pixel_values is None else (pixel_values.shape[1] if pixel_values.ndim == 5 else 1)
    expected = n_images * config.tokens_per_image
    bad = np.flatnonzero(found != expected)
    if bad.size:
        i = int(bad[0])
        raise ImageTokenError(
            f"sample {i} holds {int(found[i])} image tokens (id {config.image_token_id}) but its {n_images} "
            f"image(s) give {expected} ({config.tokens_per_image} per image); {bad.size} sample(s) disagree."
        )


class HFVLM(nnx.Module):
    """Base of the HF VLM modules: subclasses set ``config`` (with ``image_token_id``, ``tokens_per_image`` and a
    ``text`` decoder config) and ``language_model``, and define ``embed(input_ids, pixel_values)``."""

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
