"""safetensors headers: which tensors a checkpoint holds, their dtypes, shapes and byte ranges (no tensor data).

A checkpoint is one ``.safetensors`` file, or a directory holding a single file, several, or the shards named in
``model.safetensors.index.json``. The header (8-byte length, then JSON: dtype, shape, data offsets per tensor) is
validated against the file size. Tensor data is read by :class:`~vla_foundry_jax.convert.sources.SafetensorsReader`;
config readers (e.g. timm's, which learns the architecture from tensor shapes) need only :func:`tensor_shapes`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vla_foundry_jax.configs.hf_hub import HFLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"
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


def numpy_dtype(safetensors_dtype: str) -> np.dtype:
    """The NumPy dtype of a safetensors dtype tag (bfloat16 / float8 through ``ml_dtypes``)."""
    if safetensors_dtype in _NP_DTYPES:
        return np.dtype(_NP_DTYPES[safetensors_dtype])
    if safetensors_dtype in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[safetensors_dtype]))
    raise HFLoadError(f"safetensors dtype {safetensors_dtype!r} is not supported.")


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


def read_index(index: str) -> dict[str, str]:
    """``{tensor name: shard file}`` of a sharded checkpoint's ``*.safetensors.index.json``."""
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(os.path.dirname(index), file) for name, file in weight_map.items()}


def safetensors_files(path: str) -> dict[str, str]:
    """``{tensor name: file}`` of the checkpoint at ``path``: one ``.safetensors`` file, or a directory (single
    file or sharded index)."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return dict.fromkeys(read_safetensors_header(path)[0], path)
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        return read_index(index)
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


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of the checkpoint at ``path`` (headers only)."""
    files = safetensors_files(path)
    headers = {file: read_safetensors_header(file)[0] for file in set(files.values())}
    return {name: tuple(headers[file][name]["shape"]) for name, file in files.items() if name in headers[file]}
