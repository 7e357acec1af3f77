"""Latency and throughput of a served policy: in-process ``Policy.step`` against the websocket server.

    python benchmarks/serve_policy.py                          # both policies, random weights
    python benchmarks/serve_policy.py --run_dir=runs/vla_quickstart --requests=300

Policies (``diffusion_policy``, 10 flow steps, a chunk sampled at every step, i.e. ``execute_steps = 1``):

* ``vla_quickstart``: gin_configs/vla_quickstart.gin (one 32 x 32 camera; ``--run_dir`` loads a trained run
  instead of random weights);
* ``vit_tiny_2cam_224``: the same denoiser over a ``vit_tiny`` backbone (224 x 224, patch 14, width 64, 4 blocks)
  and two cameras at 224 x 224 (random weights; ``simple_vlm`` processor over tiny_data/tokenizer).

Per policy: p50 / p99 latency of one step at batch 1 in-process and through the server (a separate process on
loopback; the client sends uint8 images at the dataset size), the server's overhead (p50 difference), and
throughput (requests/s) with 1, 4 and 16 concurrent clients (threads, one connection each, closed loop), plus the
ratio ``time(16 clients x N) / time(1 client x N)`` (16 means batching bought nothing; 1 means free).
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


def client_latency(url: str, obs: dict[str, Any], n: int) -> tuple[list[float], list[float]]:
    from vla_foundry_jax_client import PolicyClient

    with PolicyClient(url) as client:
        client.reset(seed=0, execute_steps=1)
        for _ in range(10):
            client.infer(obs)
        total, server = [], []
        for _ in range(n):
            t = time.perf_counter()
            client.infer(obs)
            total.append((time.perf_counter() - t) * 1e3)
            server.append(client.last["server_ms"])
    return total, server


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


def bench(name: str, run_dir: str | None, requests: int, flow_steps: int) -> dict[str, Any]:
    from vla_foundry_jax.serving import Execution

    policy = build_policy(name, run_dir, flow_steps)
    obs = observation(policy, np.random.default_rng(0))
    session = policy.new_session(0, Execution(execute_steps=1))
    for _ in range(10):
        policy.step(session, obs)
    inproc = []
    for _ in range(requests):
        t = time.perf_counter()
        policy.step(session, obs)
        inproc.append((time.perf_counter() - t) * 1e3)

    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(name, run_dir, flow_steps, ports), daemon=True)
    server.start()
    try:
        url = f"ws://127.0.0.1:{ports.get(timeout=900)}"
        total, in_server = client_latency(url, obs, requests)
        per_client = max(requests // 4, 20)
        seconds = {k: throughput(url, obs, k, per_client) for k in (1, 4, 16)}
    finally:
        server.terminate()
        server.join(10)
    p50_in, p99_in = percentiles(inproc)
    p50_srv, p99_srv = percentiles(total)
    return {
        "policy": name,
        "weights": run_dir or "random",
        "flow_steps": flow_steps,
        "inprocess_p50_ms": round(p50_in, 3),
        "inprocess_p99_ms": round(p99_in, 3),
        "server_p50_ms": round(p50_srv, 3),
        "server_p99_ms": round(p99_srv, 3),
        "server_overhead_p50_ms": round(p50_srv - p50_in, 3),
        "time_in_server_p50_ms": round(percentiles(in_server)[0], 3),
        "requests_per_s": {str(k): round(k * per_client / s, 1) for k, s in seconds.items()},
        "time_16_clients_over_1": round(seconds[16] / seconds[1], 2),
        "requests_per_client": per_client,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", default=None, help="a trained vla_quickstart run (default: random weights)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--flow_steps", type=int, default=10)
    parser.add_argument("--only", choices=["vla_quickstart", "vit_tiny_2cam_224"], default=None)
    args = parser.parse_args()
    for name in ("vla_quickstart", "vit_tiny_2cam_224"):
        if args.only and name != args.only:
            continue
        run_dir = args.run_dir if name == "vla_quickstart" else None
        print(json.dumps(bench(name, run_dir, args.requests, args.flow_steps)), flush=True)


if __name__ == "__main__":
    main()
