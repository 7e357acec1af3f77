"""Hugging Face checkpoints on disk: resolve ``hf_pretrained``, read the config, stream the safetensors.

``hf_pretrained`` is either a local directory (``config.json`` + ``*.safetensors``, as ``save_pretrained`` writes)
or a hub id (``org/name``), fetched through the ``huggingface_hub`` cache. Offline (``HF_HUB_OFFLINE=1`` or no
network) a hub id works only when it is already in the cache; otherwise :class:`HFLoadError` says how to point at a
local copy.

Tensors are read one at a time with safetensors' NumPy API (``safe_open(framework="np")``), from a single
``model.safetensors`` or from the shards named in ``model.safetensors.index.json``. No torch import.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


class HFLoadError(ValueError):
    """An ``hf_pretrained`` checkpoint that cannot be found, read or fitted to the model."""


def resolve_hf_path(hf_pretrained: str) -> str:
    """A local directory holding the checkpoint named by ``hf_pretrained`` (directory or hub id)."""
    if not hf_pretrained:
        raise HFLoadError("hf_pretrained is not set; give a hub id (org/name) or a local directory.")
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
            raise _offline_error(hf_pretrained, "HF_HUB_OFFLINE is set and it is not in the cache") from cached_error
    try:
        return huggingface_hub.snapshot_download(hf_pretrained, allow_patterns=HUB_PATTERNS)
    except Exception as e:
        raise _offline_error(hf_pretrained, f"{type(e).__name__}: {e}") from e


def _offline_error(hub_id: str, why: str) -> HFLoadError:
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


def safetensors_files(path: str) -> dict[str, str]:
    """``{tensor name: file}`` of the checkpoint in directory ``path`` (single file or sharded index)."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        hint = (
            f" It holds PyTorch pickles ({', '.join(others)}); convert them once with PyTorch, e.g. "
            f"`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`, "
            f"and point hf_pretrained at the result."
            if others
            else ""
        )
        raise HFLoadError(f"{path} has no *.safetensors files (nor {SAFETENSORS_INDEX}).{hint}")
    from safetensors import safe_open

    out = {}
    for file in files:
        full = os.path.join(path, file)
        with safe_open(full, framework="np") as f:
            for name in f.keys():
                out[name] = full
    return out


_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_raw(file: str, name: str, dtype_name: str) -> np.ndarray:
    """One tensor of a dtype NumPy does not know, read from the file's header offsets (copy, not a memmap)."""
    import ml_dtypes

    with open(file, "rb") as f:
        (header_len,) = np.frombuffer(f.read(8), np.uint64)
        header = json.loads(f.read(int(header_len)))
        entry = header[name]
        start, end = entry["data_offsets"]
        f.seek(8 + int(header_len) + start)
        data = f.read(end - start)
    return np.frombuffer(data, getattr(ml_dtypes, dtype_name)).reshape(entry["shape"]).copy()


class SafetensorsReader:
    """Lazy reader over a checkpoint's safetensors files: names, shapes and one tensor at a time.

    Use as a context manager; files are opened on first use and closed on exit.
    """

    def __init__(self, path: str):
        self.path = path
        self.files = safetensors_files(path)
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self._open.clear()

    def _handle(self, file: str) -> Any:
        if file not in self._open:
            from safetensors import safe_open

            if not os.path.isfile(file):
                raise HFLoadError(f"{file} (named in {SAFETENSORS_INDEX}) does not exist.")
            self._open[file] = self._stack.enter_context(safe_open(file, framework="np"))
        return self._open[file]

    def keys(self) -> list[str]:
        return sorted(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a NumPy array (bfloat16 / float8 through ``ml_dtypes``, which NumPy lacks)."""
        file = self.files[name]
        handle = self._handle(file)
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in _ML_DTYPES:
            return handle.get_tensor(name)
        return _read_raw(file, name, _ML_DTYPES[dtype])

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())
