"""Tiny testbeds: generated datasets, the ReachEnv simulator and a tiny CLIP checkpoint.

They exist so that the quickstarts and the tests run offline on a CPU; ``tiny_data/`` is their bundled output
(``python -m launch.make_tiny_datasets``, :func:`vla_foundry_jax.testbeds.tiny_data.make_tiny_data`). The
production pipelines live in :mod:`vla_foundry_jax.data`; testbeds only use its shard writer.
"""
