"""Latency and throughput of a served policy: in-process ``Policy.step`` against the websocket server.

    python benchmarks/serve_policy.py                          # both policies, random weights
    python benchmarks/serve_policy.py --run_dir=runs/vla_quickstart --requests=300

Policies (``diffusion_policy``, 10 flow steps, a chunk sampled at every step, i.e. ``execute_steps = 1``):

* ``vla_quickstart``: gin_configs/vla_quickstart.gin (one 32 x 32 camera; ``--run_dir`` loads a trained run
  instead of random weights);
* ``vit_tiny_2cam_224``: the same denoiser over a ``vit_tiny`` backbone (224 x 224, patch 14, width 64, 4 blocks)
  and two cameras at 224 x 224 (random weights; ``simple_vlm`` processor over tiny_data/tokenizer).

Per policy: p50 / p99 latency of one step at batch 1 in-process and through the server (a separate process on
loopback; the client sends uint8 images at the dataset size), measured in alternating blocks of 10 so a busy
machine slows both alike; the server's overhead (p50 difference), the time spent inside the server and the
transport (round trip minus time in the server, per request); throughput
(requests/s) with 1, 4 and 16 concurrent clients (threads, one connection each, closed loop; configurations in
rotation, median of ``--rounds``), and the ratio ``time(16 clients x N) / time(1 client x N)`` (16 means batching
bought nothing; 1 means free).
Prints one JSON line per policy. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VIT_TINY_2CAM = [
    "vit_backbone.img_size = 224",
    "vit_backbone.patch_size = 14",
    "vit_backbone.hidden_dim = 64",
    "vit_backbone.inter_dim = 256",
    "vit_backbone.n_heads = 4",
    "vit_backbone.n_layers = 4",
    "transformer.max_seq_len = 1024",
    "robotics.image_size = 224",
    "robotics.processor = 'simple_vlm'",
    "robotics.tokenizer = 'tiny_data/tokenizer'",
    "robotics.camera_names = ['left', 'right']",
    "robotics.image_indices = [0]",
]
BATCH_SIZES = (1, 2, 4, 8, 16)


def build_policy(name: str, run_dir: str | None, flow_steps: int) -> Any:
    from vla_foundry_jax.serving import Policy

    if run_dir:
        return Policy.from_run(run_dir, num_flow_steps=flow_steps, batch_sizes=BATCH_SIZES)
    from flax import nnx

    from vla_foundry_jax.data.robotics import robotics_transform
    from vla_foundry_jax.gin_utils import build_experiment, parse_gin
    from vla_foundry_jax.models import build_model
    from vla_foundry_jax.training.resolve import resolve_experiment

    parse_gin(["vla_quickstart.gin"], VIT_TINY_2CAM if name == "vit_tiny_2cam_224" else [])
    exp = resolve_experiment(build_experiment())
    model = build_model(exp.model, rngs=nnx.Rngs(0), load_weights=False)
    transform = robotics_transform(exp.data, train=False)
    return Policy(model, exp, transform, None, num_flow_steps=flow_steps, batch_sizes=BATCH_SIZES)


def observation(policy: Any, rng: np.random.Generator) -> dict[str, Any]:
    h, w = policy.metadata()["image_size"]
    return {
        "images": {c: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for c in policy.cameras},
        "proprio": {f: rng.uniform(-1, 1, d) for f, d in policy.proprio_dims.items()},
        "instruction": "move to the red target",
    }


def _serve(name: str, run_dir: str | None, flow_steps: int, port_queue: Any) -> None:
    import asyncio

    from vla_foundry_jax.serving.server import PolicyServer

    policy = build_policy(name, run_dir, flow_steps)
    asyncio.run(PolicyServer(policy).run("127.0.0.1", 0, port_queue.put))


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def interleaved_latency(policy: Any, url: str, obs: dict[str, Any], n: int) -> dict[str, list[float]]:
    """Batch-1 step latencies in-process and through the server, in alternating blocks of 10 (so a busy machine
    slows both alike)."""
    from vla_foundry_jax.serving import Execution
    from vla_foundry_jax_client import PolicyClient

    session = policy.new_session(0, Execution(execute_steps=1))
    out: dict[str, list[float]] = {"inprocess": [], "server": [], "in_server": []}
    with PolicyClient(url) as client:
        client.reset(seed=0, execute_steps=1)
        for _ in range(10):
            policy.step(session, obs)
            client.infer(obs)
        for _ in range(max(n // 10, 1)):
            for _ in range(10):
                t = time.perf_counter()
                policy.step(session, obs)
                out["inprocess"].append((time.perf_counter() - t) * 1e3)
            for _ in range(10):
                t = time.perf_counter()
                client.infer(obs)
                out["server"].append((time.perf_counter() - t) * 1e3)
                out["in_server"].append(client.last["server_ms"])
    return out


def throughput(url: str, obs: dict[str, Any], clients: int, n: int) -> float:
    """Seconds for ``clients`` concurrent clients to make ``n`` requests each."""
    from vla_foundry_jax_client import PolicyClient

    conns = [PolicyClient(url) for _ in range(clients)]
    for c in conns:
        c.reset(seed=0, execute_steps=1)
        c.infer(obs)
    barrier = threading.Barrier(clients + 1)

    def loop(c: Any) -> None:
        barrier.wait()
        for _ in range(n):
            c.infer(obs)

    threads = [threading.Thread(target=loop, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return elapsed


def bench(name: str, run_dir: str | None, requests: int, flow_steps: int, rounds: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(name, run_dir, flow_steps, ports), daemon=True)
    server.start()
    policy = build_policy(name, run_dir, flow_steps)
    obs = observation(policy, np.random.default_rng(0))
    try:
        url = f"ws://127.0.0.1:{ports.get(timeout=1800)}"
        lat = interleaved_latency(policy, url, obs, requests)
        per_client = max(requests // 8, 10)
        seconds: dict[int, list[float]] = {1: [], 4: [], 16: []}
        for _ in range(rounds):  # configurations in rotation; the median of each
            for k in seconds:
                seconds[k].append(throughput(url, obs, k, per_client))
    finally:
        server.terminate()
        server.join(10)
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    p50_in, p99_in = percentiles(lat["inprocess"])
    p50_srv, p99_srv = percentiles(lat["server"])
    return {
        "policy": name,
        "weights": run_dir or "random",
        "flow_steps": flow_steps,
        "inprocess_p50_ms": round(p50_in, 3),
        "inprocess_p99_ms": round(p99_in, 3),
        "server_p50_ms": round(p50_srv, 3),
        "server_p99_ms": round(p99_srv, 3),
        "server_overhead_p50_ms": round(p50_srv - p50_in, 3),
        "time_in_server_p50_ms": round(percentiles(lat["in_server"])[0], 3),
        # per request: round trip minus the time inside the server = websocket + msgpack + client, both ways
        "transport_p50_ms": round(percentiles(list(np.subtract(lat["server"], lat["in_server"])))[0], 3),
        "requests_per_s": {str(k): round(k * per_client / s, 1) for k, s in med.items()},
        "time_16_clients_over_1": round(med[16] / med[1], 2),
        "requests_per_client": per_client,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", default=None, help="a trained vla_quickstart run (default: random weights)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--flow_steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (median)")
    parser.add_argument("--only", choices=["vla_quickstart", "vit_tiny_2cam_224"], default=None)
    args = parser.parse_args()
    for name in ("vla_quickstart", "vit_tiny_2cam_224"):
        if args.only and name != args.only:
            continue
        run_dir = args.run_dir if name == "vla_quickstart" else None
        print(json.dumps(bench(name, run_dir, args.requests, args.flow_steps, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
