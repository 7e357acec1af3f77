"""Weight converters: outside checkpoints (the original's PyTorch state dicts, HF safetensors) -> Flax pytrees.

* :mod:`vla_foundry_jax.convert.vit_weights` - ``vit.pretrained``: the original's ViT safetensors or one of our
  Orbax runs, with position-embedding resizing (registered as the ``vit`` / ``vit_backbone`` weight loader).
"""
