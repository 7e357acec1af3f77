"""The base of every error the project raises for bad input, so that every entry point reports them alike."""

from __future__ import annotations


class VLAFoundryError(Exception):
    """An expected error: a config, data, weights, checkpoint or path the user gave cannot serve.

    Its message names what the user gave and the fix. Entry points (``vla_foundry_jax.cli.run``) print it as
    ``error: <message>`` and exit with status 2, without a traceback.
    """


class UsageError(VLAFoundryError, ValueError):
    """A request an application cannot serve: a run of the wrong model type, an option value out of range."""
