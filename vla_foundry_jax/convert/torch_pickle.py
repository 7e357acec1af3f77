"""torch's ``.pt`` zip format, read and written without torch and without running code from the file.

A ``torch.save`` file is a zip archive (entries stored, under one top-level folder) holding ``data.pkl`` (a
protocol-2 pickle of the saved object), ``data/<key>`` (the raw little-endian bytes of each tensor storage) and
small records (``version``, ``byteorder``, ...). Tensors appear in the pickle as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` calls whose ``storage``
is a persistent id ``("storage", torch.<Type>Storage, key, location, numel)``.

Reading (:func:`load_pt`): the pickle is run by a restricted unpickler that resolves only the globals torch's
``weights_only=True`` allows (tensor / parameter rebuild functions, the storage types, ``OrderedDict``, ``Counter``,
``torch.Size``, ``torch.device``, ``_codecs.encode`` for bytes, ``set`` / ``bytearray`` / ``complex``) to harmless
stand-ins of our own; any other global raises :class:`TorchPickleError` naming the file and the global before it is
called, and ``BUILD`` is allowed on ``OrderedDict`` only. Tensors come back as :class:`TensorRef` (shape and dtype
known, bytes read on :meth:`TensorRef.numpy`), bfloat16 through ``ml_dtypes``. No torch import.

Writing (:func:`save_pt`): NumPy arrays in nested dicts / lists / tuples / scalars / strings become a file that
``torch.load(path, weights_only=True)`` reads as tensors; the archive is written beside the target and renamed
into place (never half-written). Each storage is 64-byte aligned in the archive, as torch writes them.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import zipfile
from collections.abc import Iterator
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from vla_foundry_jax.errors import VLAFoundryError


class TorchPickleError(VLAFoundryError, ValueError):
    """A ``.pt`` file that cannot be read safely: not torch's zip format, truncated, or naming a forbidden global."""


STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
ALIGNMENT = 64


# ----------------------------------------------------------------------------------------------------------
# Reading


class _StorageType:
    """Stand-in for ``torch.<Type>Storage`` in a persistent id."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    """One ``data/<key>`` record of the archive, read once on first use."""

    def __init__(self, archive: _Archive, key: str, dtype: np.dtype, numel: int):
        self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self.archive.read(f"data/{self.key}")
            if len(raw) < self.numel * self.dtype.itemsize:
                raise TorchPickleError(
                    f"{self.archive.path}: storage data/{self.key} holds {len(raw)} bytes, fewer than its "
                    f"{self.numel} {self.dtype} elements; the file is truncated or damaged, copy it again."
                )
            self._array = np.frombuffer(raw, self.dtype, count=self.numel)
        return self._array


class TensorRef:
    """A tensor of a ``.pt`` file: ``shape`` and ``dtype`` known, the data read by :meth:`numpy`."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)
        self.dtype = storage.dtype

    def numpy(self) -> np.ndarray:
        """A fresh C-contiguous array of the tensor (views and strides resolved)."""
        base = self.storage.array()
        n = int(np.prod(self.shape, dtype=np.int64))
        if n == 0:
            return np.zeros(self.shape, self.dtype)
        last = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride, strict=True))
        if self.offset < 0 or last >= base.size:
            raise TorchPickleError(
                f"{self.storage.archive.path}: a tensor of shape {self.shape} reaches past its storage "
                f"data/{self.storage.key}; the file is damaged."
            )
        item = self.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :], self.shape, tuple(s * item for s in self.stride), writeable=False
        )
        return np.array(view, order="C")

    def __repr__(self) -> str:
        return f"TensorRef(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise TorchPickleError("a tensor rebuild call without a storage")
    return TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    return func(*args)


def _encode(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise TorchPickleError("_codecs.encode is allowed for latin1 strings (pickled bytes) only")
    return text.encode("latin1")


class _Marker:
    """Stand-in for an allowed torch object that carries no data (``torch.Tensor``, ``torch.Parameter``)."""

    def __init__(self, name: str):
        self.name = name


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.nn.parameter", "Parameter"): _Marker("Parameter"),
    ("torch", "Tensor"): _Marker("Tensor"),
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Archive:
    """The records of one ``.pt`` zip archive (names relative to its top-level folder)."""

    def __init__(self, path: str, data: bytes):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            names = self.zip.namelist()
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            hint = (
                "it is a pre-1.6 torch pickle (not a zip): load it with torch and save it again with torch>=1.6"
                if data[:2] == b"\x80\x02"
                else "the file is truncated or is not a torch.save file; copy it again"
            )
            raise TorchPickleError(f"{path}: not a readable torch zip archive ({e}); {hint}.") from e
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchPickleError(f"{path}: a zip archive without one <folder>/data.pkl; not a torch.save file.")
        self.prefix = pkl[0][: -len("data.pkl")]
        order = self.prefix + "byteorder"
        if order in names and self.zip.read(order).strip() not in (b"little", b""):
            raise TorchPickleError(f"{path}: stored big-endian; only little-endian torch files are read.")

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError as e:
            raise TorchPickleError(f"{self.path}: the archive has no record {name}; the file is damaged.") from e
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # CRC / length errors of a cut file
            raise TorchPickleError(
                f"{self.path}: record {name} cannot be read ({e}); the file is truncated or damaged, copy it again."
            ) from e


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be restricted
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, archive: _Archive):
        super().__init__(io.BytesIO(archive.read("data.pkl")), encoding="utf-8")
        self.archive = archive
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # protocol 2 writes Python 2 names (__builtin__.set)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise TorchPickleError(
                f"{self.archive.path} refers to the global {module}.{name}, which a weights-only checkpoint never "
                f"needs; it was not loaded (it could run code). Load only files you trust, or re-save the state dict "
                f"with plain tensors."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchPickleError(f"{self.archive.path}: unsupported persistent id {str(pid)[:80]!r}.")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise TorchPickleError(f"{self.archive.path}: storage {key!r} has no supported dtype ({kind!r}).")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(self.archive, key, kind.dtype, int(numel))
        return self.storages[key]

    def load_build(self) -> None:
        state = self.stack[-1]
        if type(self.stack[-2]) is not collections.OrderedDict or not isinstance(state, dict):
            raise TorchPickleError(f"{self.archive.path}: BUILD on {type(self.stack[-2]).__name__} is not allowed.")
        self.stack.pop()
        self.stack[-1].__dict__.update(state)

    dispatch[pickle.BUILD[0]] = load_build

    def _forbidden(self) -> None:
        raise TorchPickleError(f"{self.archive.path}: the pickle uses an opcode a weights-only checkpoint never has.")

    for _opcode in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):  # never in torch.save files
        dispatch[_opcode[0]] = _forbidden
    del _opcode


def load_pt(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path``, tensors as :class:`TensorRef` (see the module docstring).

    Raises :class:`TorchPickleError` for a truncated or damaged file or a global outside the allow-list; nothing in
    the file is executed."""
    with open(path, "rb") as f:
        data = f.read()
    archive = _Archive(path, data)
    try:
        return _SafeUnpickler(archive).load()
    except TorchPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise TorchPickleError(f"{path}: its pickle (data.pkl) cannot be read ({type(e).__name__}: {e}).") from e


def to_numpy(obj: Any) -> Any:
    """``obj`` with every :class:`TensorRef` read into a NumPy array (containers rebuilt)."""
    if isinstance(obj, TensorRef):
        return obj.numpy()
    if isinstance(obj, dict):
        out = obj.copy()  # keeps the mapping's type (OrderedDict, Counter)
        for k, v in obj.items():
            out[k] = to_numpy(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


class StateDictSource:
    """A conversion-engine source (``keys`` / ``shape`` / ``get``) over a loaded state dict of :class:`TensorRef`;
    non-tensor entries are left out."""

    def __init__(self, state_dict: dict[str, Any], where: str = ""):
        self.tensors = {k: v for k, v in state_dict.items() if isinstance(v, TensorRef)}
        self.where = where

    def __enter__(self) -> StateDictSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def full_name(self, name: str) -> str:
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name].numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


# ----------------------------------------------------------------------------------------------------------
# Writing


class _Global:
    """A global written into the pickle by name (torch need not be importable here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle requires a callable; only its name is written
        raise TypeError(f"{self.module}.{self.name} is a name written into a pickle, not a function.")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")


class _OutStorage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Pickler(pickle._Pickler):
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def __init__(self, file: Any):
        super().__init__(file, protocol=2)
        self.storages: list[_OutStorage] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _OutStorage):
            name = _DTYPE_STORAGES[obj.array.dtype]
            return ("storage", _Global("torch", name), obj.key, "cpu", int(obj.array.size))
        return None

    def save_torch_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_torch_global

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.generic) and not isinstance(obj, np.ndarray):
            return (_identity_scalar(obj), ())
        if not isinstance(obj, np.ndarray):
            return NotImplemented
        if obj.dtype not in _DTYPE_STORAGES:
            raise TorchPickleError(f"save_pt: dtype {obj.dtype} has no torch storage type.")
        array = obj if obj.flags.c_contiguous else np.array(obj, order="C")  # (ascontiguousarray makes 0-d 1-d)
        storage = _OutStorage(str(len(self.storages)), array)
        self.storages.append(storage)
        stride = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
        return _REBUILD, (storage, 0, tuple(array.shape), stride, False, collections.OrderedDict())


def _identity_scalar(value: np.generic) -> Any:
    raise TorchPickleError(f"save_pt: NumPy scalar {value!r}; give a Python number or a 0-d array.")


def _aligned_write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """Write a stored record whose data starts on an :data:`ALIGNMENT` boundary (padding in the extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    offset = zf.fp.tell() + 30 + len(name.encode())
    pad = -(offset + 4) % ALIGNMENT
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    zf.writestr(info, data)


def save_pt(obj: Any, path: str) -> None:
    """Write ``obj`` (NumPy arrays in dicts / OrderedDicts / lists / tuples, Python scalars and strings) as a torch
    zip archive at ``path`` that ``torch.load(path, weights_only=True)`` reads; written whole, then renamed."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    folder = "archive/"
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            _aligned_write(zf, folder + "data.pkl", buf.getvalue())
            _aligned_write(zf, folder + "byteorder", b"little")
            for storage in pickler.storages:
                _aligned_write(zf, f"{folder}data/{storage.key}", storage.array.tobytes())
            _aligned_write(zf, folder + "version", b"3\n")
            _aligned_write(zf, folder + ".data/serialization_id", b"0" * 40)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
