"""Thin client of ``launch.serve_policy``: NumPy, websockets and msgpack only (no JAX).

    from vla_foundry_jax_client import PolicyClient

    client = PolicyClient("ws://127.0.0.1:8765")
    print(client.metadata["action_fields"])
    client.reset(seed=0, execute_steps=4)
    action = client.infer({"images": {"scene": image}, "proprio": {"agent_xy": xy}, "instruction": "..."})

The schema is in :mod:`vla_foundry_jax_client.protocol`.
"""

from vla_foundry_jax_client.client import PolicyClient, ServerError
from vla_foundry_jax_client.protocol import SCHEMA_VERSION, ProtocolError, pack, unpack

__all__ = ["SCHEMA_VERSION", "PolicyClient", "ProtocolError", "ServerError", "pack", "unpack"]
