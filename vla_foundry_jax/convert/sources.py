"""Tensor sources for the conversion engine: a mapping ``name -> NumPy array`` read lazily, one tensor at a time.

A source has ``keys()``, ``shape(name)`` and ``get(name)`` (a fresh array the caller owns) and is a context manager.
:class:`SafetensorsReader` reads a single ``.safetensors`` file, a directory of them or the shards of an index;
:class:`PrefixedSource` is the view of the names under a prefix (``module.``, a VLM's ``vit.``...) with the prefix
removed. A new checkpoint format (e.g. PyTorch pickles) is one more class with these three methods.

safetensors reading: the header (JSON: dtype, shape, byte offsets; :mod:`vla_foundry_jax.configs.safetensors`) is
parsed once per file and each tensor's bytes are read with a plain ``readinto`` into a fresh 64-byte-aligned NumPy
buffer. No mmap (whose page-cache pages would count in resident memory until the file is closed, a second model
copy by the end), and the buffer's alignment lets ``jax.device_put`` on CPU alias it rather than copy it. bfloat16 /
float8 come through ``ml_dtypes``. No torch import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from vla_foundry_jax.configs.hf_hub import HFLoadError
from vla_foundry_jax.configs.safetensors import (
    SAFETENSORS_INDEX,
    numpy_dtype,
    read_safetensors_header,
    safetensors_files,
)

# XLA's CPU client aliases (rather than copies) host buffers with this alignment in ``jax.device_put``
HOST_ALIGNMENT = 64


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


class SafetensorsReader:
    """Lazy reader over a checkpoint's safetensors files: names, shapes and one tensor at a time.

    Use as a context manager; files are opened on first use and closed on exit. Each :meth:`get` reads the tensor's
    bytes with plain file reads (no mmap) into a new aligned array that the caller owns.
    """

    def __init__(self, path: str, files: dict[str, str] | None = None):
        """``path``: a ``.safetensors`` file or a directory; ``files``: an explicit ``{tensor name: file}`` map
        (e.g. the shards of an index with another name than ``model.safetensors.index.json``)."""
        self.path = path
        self.files = safetensors_files(path) if files is None else files
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

    def full_name(self, name: str) -> str:
        return name

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


class PrefixedSource:
    """The tensors of ``source`` whose names start with ``prefix``, named without it."""

    def __init__(self, source: Any, prefix: str):
        self.source, self.prefix = source, prefix

    def __enter__(self) -> PrefixedSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def full_name(self, name: str) -> str:
        return self.prefix + name

    def keys(self) -> list[str]:
        n = len(self.prefix)
        return [k[n:] for k in self.source.keys() if k.startswith(self.prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.prefix + name)

    def get(self, name: str) -> np.ndarray:
        return self.source.get(self.prefix + name)


def open_safetensors(path: str, hint: str = "") -> SafetensorsReader:
    """A reader over ``path``: a directory of safetensors files or one ``.safetensors`` file (``hint`` is added to
    the error for another kind of file, e.g. how to convert a PyTorch pickle)."""
    if os.path.isdir(path):
        return SafetensorsReader(path)
    if not os.path.isfile(path):
        raise HFLoadError(f"{path} does not exist.")
    if not path.endswith(".safetensors"):
        raise HFLoadError(f"{path} is not a .safetensors file{'; ' + hint if hint else '.'}")
    return SafetensorsReader(path)
