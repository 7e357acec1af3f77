"""The policy server's wire format (schema version 1): msgpack maps, NumPy arrays as tagged maps.

Every message is one binary websocket frame holding a msgpack map. An array is the map
``{"__ndarray__": true, "dtype": "<f4", "shape": [..], "data": <raw bytes, C order>}``; only bool, integer and float
dtypes are accepted (no object arrays, nothing that runs code when read).

Server -> client, once on connect::

    {"type": "metadata", "schema_version": 1, "cameras": [..], "image_names": [..], "image_size": [h, w],
     "proprio_fields": {name: dim}, "action_fields": {name: dim}, "action_horizon": Ta, "past_steps": p,
     "num_flow_steps": n, "batch_sizes": [..], "execution": {..}}

Client -> server (each may carry an ``id``, echoed in the reply)::

    {"type": "infer", "schema_version": 1, "observation": {"images": {camera: uint8 [H, W, 3]},
                                                          "proprio": {name: float [dim]}, "instruction": str}}
    {"type": "reset", "schema_version": 1, "seed": int, "execution": {"mode": "receding" | "ensemble",
                                                                     "execute_steps": k, "ensemble_decay": m}}

Server -> client replies::

    {"type": "actions", "id": .., "actions": {name: float32 [dim]},        the action to execute now
     "chunk": {name: float32 [Ta, dim]}, "replanned": bool, "step": int,  the newest chunk, current step first
     "server_ms": float}                                                  time spent in the server
    {"type": "reset", "id": .., "seed": int}
    {"type": "error", "id": .., "field": "images.wrist", "message": ".. expected .."}

An error reply never closes the connection; the session's history is unchanged by a rejected request.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
_KINDS = "biuf"


class ProtocolError(ValueError):
    """A message that does not follow the schema; ``field`` names the offending entry."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send a {obj.dtype} array (bool, integer and float arrays only)")
        arr = np.ascontiguousarray(obj)
        return {"__ndarray__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if obj.get("__ndarray__") is not True:
        return obj
    try:
        dtype = np.dtype(obj["dtype"])
        shape = tuple(int(s) for s in obj["shape"])
        data = obj["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError("array", f"malformed array ({e}); expected dtype, shape and data.") from None
    if dtype.kind not in _KINDS or not isinstance(data, bytes):
        raise ProtocolError("array", f"dtype {dtype} is not a bool, integer or float dtype.")
    if any(s < 0 for s in shape) or int(np.prod(shape)) * dtype.itemsize != len(data):
        raise ProtocolError("array", f"{len(data)} bytes do not hold a {dtype} array of shape {list(shape)}.")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def pack(message: dict[str, Any]) -> bytes:
    """One message as a msgpack frame."""
    return msgpack.packb(message, default=_encode, use_bin_type=True)


def unpack(frame: bytes | str) -> dict[str, Any]:
    """A frame as a message map; a ProtocolError when it is not one."""
    if not isinstance(frame, bytes):
        raise ProtocolError("message", "expected a binary msgpack frame, got text.")
    try:
        message = msgpack.unpackb(frame, object_hook=_decode, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError("message", f"not a msgpack frame ({type(e).__name__}).") from None
    if not isinstance(message, dict):
        raise ProtocolError("message", f"expected a map, got {type(message).__name__}.")
    return message
