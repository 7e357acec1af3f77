"""vla_foundry_jax: LLM -> VLM -> VLA training in JAX/Flax NNX.

Importing the package registers every params class with gin (under its type key) and every model
builder and loss with the registry, so gin files need no import lines. On the CPU backend it also sets the host
allocator to keep freed memory for reuse (``host_memory``; ``VLA_FOUNDRY_KEEP_HOST_MEMORY=0`` turns it off).
"""

import warnings

from vla_foundry_jax import host_memory
from vla_foundry_jax.errors import UsageError

# Before anything imports jaxlib: its import starts a thread, and a thread that already took a malloc arena keeps it.
try:
    host_memory.keep_freed_host_memory()
except UsageError as exc:  # launch/ reports it as one error line and exits 2
    warnings.warn(str(exc), stacklevel=2)

import flax

# Parameters carry logical axis names (``out_sharding`` metadata); we place them on the mesh ourselves
# (vla_foundry_jax.parallel) instead of letting Flax shard eagerly at creation.
flax.config.update("flax_always_shard_variable", False)

from vla_foundry_jax import models, params  # noqa: E402,F401  (register model builders, params with gin)

__version__ = "0.1.0"
