"""Weight converters: outside checkpoints -> Flax parameters, through one engine.

* :mod:`.engine` - the :class:`~.engine.Rule` / :class:`~.engine.Transform` types, the strict loader
  :func:`~.engine.load_rules` (placement on the target shardings, layer stacking, prefixes) and its mismatch
  report (:class:`vla_foundry_jax.checkpoint.Mismatch`, shared with the Orbax restore);
* :mod:`.sources` - tensor sources (``name -> NumPy array``, read lazily): safetensors, prefixed views;
* one table module per source, each exposing its weight loader ``fn(params, states, prefix) -> states``:
  :mod:`.hf_decoder_maps` (HF decoders, ``transformer_hf``), :mod:`.hf_vision_maps` (HF SigLIP / CLIP: ``vit_hf``,
  ``clip_hf``), :mod:`.timm_vit_maps` (timm ViTs for ``vit_hf``), :mod:`.openclip_maps` (``clip_openclip``),
  :mod:`.diffusers_unet_maps` (``unet``), :mod:`.vit_weights` (the original's ViT safetensors or one of our runs:
  ``vit`` / ``vit_backbone``), :mod:`.vlm_hf_maps` (PaliGemma / Idefics3: ``vlm_hf``);
* :mod:`.hf_export` - ``transformer_hf`` back to HF safetensors (the decoder table inverted);
* :mod:`.torch_pickle`, :mod:`.foundry_maps`, :mod:`.foundry_unet_maps` - the original's ``.pt`` checkpoints
  (read / written without torch) and its state-dict names per model type, both ways.

Imports :mod:`vla_foundry_jax.configs`, :mod:`vla_foundry_jax.checkpoint` and params, never the models.
"""
