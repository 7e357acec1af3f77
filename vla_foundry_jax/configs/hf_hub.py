"""Hugging Face checkpoints on disk: resolve ``hf_pretrained`` and read its ``config.json``.

``hf_pretrained`` is either a local directory (``config.json`` + ``*.safetensors``, as ``save_pretrained`` writes)
or a hub id (``org/name``), fetched through the ``huggingface_hub`` cache. Offline (``HF_HUB_OFFLINE=1`` or no
network) a hub id works only when it is already in the cache; otherwise :class:`HFLoadError` says how to point at a
local copy.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from vla_foundry_jax import paths
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params.model_params import set_hf_config_reader

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


class HFLoadError(VLAFoundryError, ValueError):
    """An ``hf_pretrained`` checkpoint that cannot be found, read or fitted to the model."""


def resolve_hf_path(hf_pretrained: str) -> str:
    """A local directory holding the checkpoint named by ``hf_pretrained`` (directory or hub id)."""
    if not hf_pretrained:
        raise HFLoadError("hf_pretrained is not set; give a hub id (org/name) or a local directory.")
    if "://" in hf_pretrained:  # s3://, gs://, hf://: a local copy (cached) of the directory
        try:
            return paths.local_dir(hf_pretrained)
        except paths.PathError as e:
            raise HFLoadError(f"hf_pretrained: {e}") from None
    local = os.path.abspath(os.path.expanduser(hf_pretrained))
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise HFLoadError(
            f"hf_pretrained = {hf_pretrained!r} is a file; give the directory that holds config.json and the "
            f"*.safetensors files."
        )
    looks_like_path = hf_pretrained.startswith((".", "/", "~")) or hf_pretrained.count("/") > 1
    if looks_like_path:
        raise HFLoadError(f"hf_pretrained = {hf_pretrained!r}: no such directory.")
    import huggingface_hub
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return huggingface_hub.snapshot_download(hf_pretrained, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception as cached_error:  # not in the cache
        if offline:
            raise offline_error(hf_pretrained, "HF_HUB_OFFLINE is set and it is not in the cache") from cached_error
    try:
        return huggingface_hub.snapshot_download(hf_pretrained, allow_patterns=HUB_PATTERNS)
    except Exception as e:
        raise offline_error(hf_pretrained, f"{type(e).__name__}: {e}") from e


def offline_error(hub_id: str, why: str) -> HFLoadError:
    """The error for a hub id that cannot be fetched: how to bring a local copy instead."""
    return HFLoadError(
        f"hf_pretrained = {hub_id!r} could not be fetched from the Hugging Face hub ({why}). On a machine with network "
        f"access run `huggingface-cli download {hub_id} --local-dir <dir>` (or "
        f"`huggingface_hub.snapshot_download({hub_id!r}, local_dir=<dir>)`), copy <dir> here and set "
        f"hf_pretrained = '<dir>'; or pre-fill the huggingface_hub cache (HF_HOME) with it."
    )


def load_hf_config(hf_pretrained: str) -> Any:
    """``transformers.AutoConfig`` of the checkpoint (after :func:`resolve_hf_path`)."""
    path = resolve_hf_path(hf_pretrained)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HFLoadError(f"hf_pretrained = {hf_pretrained!r}: {path} has no config.json.")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


set_hf_config_reader(functools.lru_cache(maxsize=32)(load_hf_config))  # TransformerHFParams.hidden_dim / vocab_size
