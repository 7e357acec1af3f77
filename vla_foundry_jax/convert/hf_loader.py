"""Hugging Face checkpoints on disk: resolve ``hf_pretrained``, read the config, stream the safetensors.

``hf_pretrained`` is either a local directory (``config.json`` + ``*.safetensors``, as ``save_pretrained`` writes)
or a hub id (``org/name``), fetched through the ``huggingface_hub`` cache. Offline (``HF_HUB_OFFLINE=1`` or no
network) a hub id works only when it is already in the cache; otherwise :class:`HFLoadError` says how to point at a
local copy.

Tensors are read one at a time from a single ``model.safetensors`` or from the shards named in
``model.safetensors.index.json``: the safetensors header (JSON: dtype, shape, byte offsets) is parsed once per file
and each tensor's bytes are read with a plain ``readinto`` into a fresh 64-byte-aligned NumPy buffer. No mmap (whose
page-cache pages would count in resident memory until the file is closed, a second model copy by the end), and
the buffer's alignment lets ``jax.device_put`` on CPU alias it rather than copy it. bfloat16 / float8 come through
``ml_dtypes``. No torch import.
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
    """``{tensor name: file}`` of the checkpoint at ``path``: one ``.safetensors`` file, or a directory (single
    file or sharded index)."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return dict.fromkeys(read_safetensors_header(path)[0], path)
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
    out = {}
    for file in files:
        full = os.path.join(path, file)
        for name in read_safetensors_header(full)[0]:
            out[name] = full
    return out


_NP_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# XLA's CPU client aliases (rather than copies) host buffers with this alignment in ``jax.device_put``
HOST_ALIGNMENT = 64


def numpy_dtype(safetensors_dtype: str) -> np.dtype:
    """The NumPy dtype of a safetensors dtype tag (bfloat16 / float8 through ``ml_dtypes``)."""
    if safetensors_dtype in _NP_DTYPES:
        return np.dtype(_NP_DTYPES[safetensors_dtype])
    if safetensors_dtype in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[safetensors_dtype]))
    raise HFLoadError(f"safetensors dtype {safetensors_dtype!r} is not supported.")


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a :data:`HOST_ALIGNMENT`-byte boundary.

    ``jax.device_put`` on the CPU backend then takes the buffer as the array's storage (no second host copy); the
    caller must not write to it afterwards.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def read_safetensors_header(file: str) -> tuple[dict[str, dict[str, Any]], int]:
    """``({tensor name: {"dtype", "shape", "data_offsets"}}, byte offset of the data section)`` of ``file``."""
    if not os.path.isfile(file):
        raise HFLoadError(f"{file} (named in {SAFETENSORS_INDEX}) does not exist.")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise HFLoadError(f"{file} is not a safetensors file (bad header length).")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise HFLoadError(f"{file} is not a safetensors file (header is not JSON: {e}).") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        want = int(np.prod(entry["shape"], dtype=np.int64)) * numpy_dtype(entry["dtype"]).itemsize
        if not 0 <= begin <= end or data_start + end > size or end - begin != want:
            raise HFLoadError(f"{file}: tensor {name!r} has bad data offsets {entry['data_offsets']}.")
    return header, data_start


class SafetensorsReader:
    """Lazy reader over a checkpoint's safetensors files: names, shapes and one tensor at a time.

    Use as a context manager; files are opened on first use and closed on exit. Each :meth:`get` reads the tensor's
    bytes with plain file reads (no mmap) into a new aligned array that the caller owns.
    """

    def __init__(self, path: str):
        self.path = path
        self.files = safetensors_files(path)
        self._stack = contextlib.ExitStack()
        self._headers: dict[str, tuple[dict[str, dict[str, Any]], int]] = {}
        self._open: dict[str, Any] = {}

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self._open.clear()

    def _entry(self, name: str) -> tuple[str, dict[str, Any], int]:
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(file)
        header, data_start = self._headers[file]
        if name not in header:
            raise HFLoadError(f"{file} has no tensor {name!r} (named in {SAFETENSORS_INDEX}).")
        return file, header[name], data_start

    def keys(self) -> list[str]:
        return sorted(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self._entry(name)[1]["dtype"])

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new (aligned, writable) NumPy array read from the file."""
        file, entry, data_start = self._entry(name)
        begin, end = entry["data_offsets"]
        out = aligned_empty(tuple(entry["shape"]), numpy_dtype(entry["dtype"]))
        if file not in self._open:
            self._open[file] = self._stack.enter_context(open(file, "rb", buffering=0))
        f = self._open[file]
        f.seek(data_start + begin)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < end - begin:
            n = f.readinto(view[done:])
            if not n:
                raise HFLoadError(f"{file}: truncated while reading {name!r}.")
            done += n
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())
