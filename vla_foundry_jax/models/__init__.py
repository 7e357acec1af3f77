"""Model families; importing registers their builders, losses and weight loaders."""

from vla_foundry_jax.convert import (  # noqa: F401  (weight loaders)
    hf_decoder_maps,
    hf_vision_maps,
    openclip_maps,
    vit_weights,
    vlm_hf_maps,
)
from vla_foundry_jax.models import (  # noqa: F401  (builders and losses)
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
