"""A blocking websocket client of the policy server (one connection = one robot session)."""

from __future__ import annotations

import itertools
from typing import Any

from websockets.sync.client import connect

from vla_foundry_jax_client.protocol import SCHEMA_VERSION, pack, unpack


class ServerError(RuntimeError):
    """The server rejected a request; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class PolicyClient:
    """``infer(observation) -> actions`` against ``launch.serve_policy``; ``metadata`` arrives on connect."""

    def __init__(self, url: str, *, open_timeout: float = 30.0) -> None:
        # entered at once (websockets deprecates a bare connect()); closed by close() / the client's own with-block
        self._ws = connect(url, open_timeout=open_timeout, max_size=None, compression=None).__enter__()
        self._ids = itertools.count()
        self.metadata: dict[str, Any] = unpack(self._ws.recv())
        if self.metadata.get("schema_version") != SCHEMA_VERSION:
            raise ServerError(
                "schema_version",
                f"the server speaks schema {self.metadata.get('schema_version')}, this client {SCHEMA_VERSION}.",
            )
        self.last: dict[str, Any] = {}

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message (``schema_version`` and ``id`` added) and return the reply; error replies raise."""
        message = {"schema_version": SCHEMA_VERSION, "id": next(self._ids), **message}
        self._ws.send(pack(message))
        reply = unpack(self._ws.recv())
        if reply.get("type") == "error":
            raise ServerError(reply.get("field", ""), reply.get("message", ""))
        return reply

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        """The action to execute now, ``{field: float32 [dim]}``; the full reply (``chunk``, ``replanned``) is
        kept in ``last``."""
        self.last = self.request({"type": "infer", "observation": observation})
        return self.last["actions"]

    def reset(
        self, seed: int = 0, *, mode: str = "receding", execute_steps: int = 1, ensemble_decay: float = 0.01
    ) -> None:
        """Start a new episode: history cleared, noise seeded with ``seed``, execution mode set."""
        execution = {"mode": mode, "execute_steps": execute_steps, "ensemble_decay": ensemble_decay}
        self.request({"type": "reset", "seed": seed, "execution": execution})

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
