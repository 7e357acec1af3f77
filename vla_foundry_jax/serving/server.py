"""The policy server behind ``launch.serve_policy``: websockets, msgpack frames, batched device calls.

Wire format and messages: :mod:`vla_foundry_jax_client.protocol` (schema version 1). Each connection is one
robot session (:class:`~vla_foundry_jax.serving.policy.Session`): the server sends the policy's metadata on
connect, then answers ``infer`` (one control step) and ``reset`` (new episode, seed, execution mode) requests in
order. Requests are checked on arrival (an error reply names the field and what was expected; the connection and
the session stay as they were); checked observations from all connections go to one queue, and a batching task
takes what is queued (waiting up to ``batch_window_ms`` for more while other connected sessions have no request
in the batch yet), advances those sessions with one :meth:`Policy.advance` call in a worker thread (padded to the
compiled batch sizes) and replies. A session is dropped when its connection closes, mid-request or not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import signal
import threading
import time
from typing import Any

from absl import logging
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.serving.policy import Execution, ObservationError, Policy, Session
from vla_foundry_jax_client.protocol import SCHEMA_VERSION, ProtocolError, pack, unpack


class RequestError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclasses.dataclass
class _Pending:
    session: Session
    observation: dict[str, Any]
    future: asyncio.Future


class PolicyServer:
    """Serves ``policy`` (compiled for ``policy.batch_sizes``; the largest is the most one device call takes)."""

    def __init__(self, policy: Policy, *, execution: Execution | None = None, batch_window_ms: float = 2.0) -> None:
        self.policy = policy
        self.execution = (execution or Execution()).check(policy.horizon)
        self.batch_window_s = batch_window_ms / 1e3
        self.sessions: dict[int, Session] = {}  # connection id -> its session (dropped on disconnect)
        self.device_calls = 0
        self.batch_rows: list[int] = []  # sessions per device call (bounded history for stats)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")

    # ------------------------------------------------------------------ requests

    def _metadata(self) -> dict[str, Any]:
        meta = {"type": "metadata", "schema_version": SCHEMA_VERSION, **self.policy.metadata()}
        meta["execution"] = dataclasses.asdict(self.execution)
        return meta

    async def _handle(self, key: int, frame: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            message = unpack(frame)
        except ProtocolError as e:
            return {"type": "error", "field": e.field, "message": str(e)}
        rid = message.get("id")
        try:
            reply = await self._dispatch(key, message)
        except RequestError as e:
            return {"type": "error", "id": rid, "field": e.field, "message": e.message}
        except (ObservationError, ProtocolError) as e:
            return {"type": "error", "id": rid, "field": e.field, "message": str(e)}
        except VLAFoundryError as e:
            return {"type": "error", "id": rid, "field": "request", "message": str(e)}
        except Exception as e:  # anything else is a server bug: report it, keep the connection
            logging.exception("request failed")
            return {"type": "error", "id": rid, "field": "server", "message": f"{type(e).__name__}: {e}"}
        reply["id"] = rid
        reply["server_ms"] = (time.perf_counter() - start) * 1e3
        return reply

    async def _dispatch(self, key: int, message: dict[str, Any]) -> dict[str, Any]:
        version = message.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RequestError(
                "schema_version", f"unknown schema version {version!r}; this server speaks {SCHEMA_VERSION}."
            )
        kind = message.get("type")
        if kind == "reset":
            return self._reset(key, message)
        if kind != "infer":
            raise RequestError("type", f"unknown message type {kind!r}; expected 'infer' or 'reset'.")
        if "observation" not in message:
            raise RequestError("observation", "missing; an infer request carries the observation.")
        session = self.sessions[key]
        checked = self.policy.check(message["observation"])
        future = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        await self._queue.put(_Pending(session, checked, future))
        result = await future
        return {
            "type": "actions",
            "actions": result.action,
            "chunk": result.chunk,
            "replanned": result.replanned,
            "step": session.step - 1,
        }

    def _reset(self, key: int, message: dict[str, Any]) -> dict[str, Any]:
        seed = message.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise RequestError("seed", f"expected an integer in [0, 2**32), got {seed!r}.")
        execution = self.execution
        if message.get("execution") is not None:
            given = message["execution"]
            fields = {f.name for f in dataclasses.fields(Execution)}
            if not isinstance(given, dict) or set(given) - fields:
                raise RequestError("execution", f"expected a map with keys {sorted(fields)}, got {given!r}.")
            try:
                execution = Execution(**{**dataclasses.asdict(self.execution), **given}).check(self.policy.horizon)
            except (VLAFoundryError, TypeError) as e:
                raise RequestError("execution", str(e)) from None
        self.sessions[key] = self.policy.new_session(seed, execution)
        return {"type": "reset", "seed": seed}

    # ------------------------------------------------------------------ connections and batching

    async def _connection(self, ws: Any) -> None:
        key = id(ws)
        self.sessions[key] = self.policy.new_session(0, self.execution)
        try:
            await ws.send(pack(self._metadata()))
            async for frame in ws:
                await ws.send(pack(await self._handle(key, frame)))
        except ConnectionClosed:
            pass
        finally:
            self.sessions.pop(key, None)

    def _advance(self, items: list[_Pending]) -> list[Any]:
        return self.policy.advance([p.session for p in items], [p.observation for p in items])

    async def _batcher(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        largest = self.policy.batch_sizes[-1]
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.batch_window_s
            while len(items) < largest:
                if not self._queue.empty():
                    items.append(self._queue.get_nowait())
                    continue
                # wait for more only while other connected sessions might still send this step
                if len(items) >= len(self.sessions) or loop.time() >= deadline:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), deadline - loop.time()))
                except TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(self._worker, self._advance, items)
            except Exception as e:  # a bug in one batch must not stop the server: every request of it gets an error
                logging.exception("device call failed")
                for p in items:
                    if not p.future.done():
                        p.future.set_exception(RequestError("server", f"the policy call failed: {e}"))
                continue
            self.device_calls += 1
            self.batch_rows = [*self.batch_rows[-9999:], len(items)]
            for p, r in zip(items, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)

    async def run(self, host: str, port: int, ready: Any = None) -> None:
        """Serve until cancelled; ``ready(port)`` is called once listening (``port`` 0 picks a free one)."""
        self._queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        try:
            async with serve(self._connection, host, port, max_size=2**26, compression=None) as server:
                bound = server.sockets[0].getsockname()[1]
                if ready is not None:
                    ready(bound)
                await asyncio.get_running_loop().create_future()  # forever
        finally:
            batcher.cancel()


class ServerThread:
    """A :class:`PolicyServer` on its own event loop thread (``with ServerThread(server) as url: ...``)."""

    def __init__(self, server: PolicyServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server, self.host, self.port = server, host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.server.run(self.host, self.port, self._bound))
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass

    def _bound(self, port: int) -> None:
        self.port = port
        self._ready.set()

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the policy server did not start")
        return f"ws://{self.host}:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


def serve_policy(
    run_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    num_flow_steps: int | None = 10,
    use_ema: bool = True,
    execute_steps: int = 1,
    max_batch: int = 16,
    batch_window_ms: float = 2.0,
    seed: int = 0,
    pin_cpu_threads: bool = True,
) -> None:
    """Load the run's policy (compiled for batch sizes 1, 2, 4, .. up to ``max_batch``; ``pin_cpu_threads``: see
    :meth:`Policy.from_run`) and serve it until SIGINT or SIGTERM."""
    sizes = sorted({min(2**i, max_batch) for i in range(max(max_batch, 1).bit_length() + 1)})
    policy = Policy.from_run(
        run_dir,
        num_flow_steps=num_flow_steps,
        use_ema=use_ema,
        seed=seed,
        batch_sizes=sizes,
        pin_cpu_threads=pin_cpu_threads,
    )
    server = PolicyServer(policy, execution=Execution(execute_steps=execute_steps), batch_window_ms=batch_window_ms)

    def ready(bound: int) -> None:
        print(f"serving {run_dir} on ws://{host}:{bound} (batch sizes {list(sizes)})", flush=True)

    async def main() -> None:
        task = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # SIGTERM stops it like Ctrl-C
        try:
            await server.run(host, port, ready)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
