"""Model families; importing registers their builders, losses and weight loaders."""

from vla_foundry_jax.convert import hf_decoder_maps, vit_weights  # noqa: F401  (weight loaders)
from vla_foundry_jax.models import hf_decoder, transformer, vit, vlm  # noqa: F401  (builders and losses)
