"""Model families, one file each: the family's maths and one record per model type.

Importing this package imports every family, so every record exists; ``build_model`` builds the model a
params object describes, with the weights it names.
"""

from vla_foundry_jax.models import (  # noqa: F401  (each family registers its records)
    backbones,
    clip,
    diffusion_policy,
    hf_decoder,
    hf_vision,
    noise_scheduler,
    openclip_configs,
    stable_diffusion,
    transformer,
    unet,
    vit,
    vlm,
    vlm_backbones,
    vlm_hf,
)
from vla_foundry_jax.models.build import build_model, load_weights

__all__ = ["build_model", "load_weights"]
