"""Model families; importing registers their builders and losses."""

from vla_foundry_jax.models import transformer  # noqa: F401
