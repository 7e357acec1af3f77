"""vla_foundry_jax: LLM -> VLM -> VLA training in JAX/Flax NNX.

Importing the package registers every params class with gin (under its type key) and every model
builder and loss with the registry, so gin files need no import lines.
"""

import flax

# Parameters carry logical axis names (``out_sharding`` metadata); we place them on the mesh ourselves
# (vla_foundry_jax.parallel) instead of letting Flax shard eagerly at creation.
flax.config.update("flax_always_shard_variable", False)

from vla_foundry_jax import models, params  # noqa: E402,F401  (register model builders, params with gin)

__version__ = "0.1.0"
