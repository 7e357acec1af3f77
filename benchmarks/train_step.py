"""Train-step speed of the from-scratch transformer on this machine (float32 by default).

    python benchmarks/train_step.py                  # every case
    python benchmarks/train_step.py --only transformer_11m

Prints one JSON object per line: model, batch, seq_len, compile_s, step_s_median, tokens_per_s (and MFU-style
model FLOP/s, peak host RSS). ``compile_depth`` cases compare compile time at n_layers 2 vs 24 (scanned layers:
~equal; benchmarks/compile_depth.py covers every scanned family). Against PyTorch: benchmarks/compare.py.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from vla_foundry_jax.params import TransformerParams

from common import build_step, time_step

PRESETS = {
    "transformer_tiny": TransformerParams(hidden_dim=64, n_layers=2, n_heads=2, max_seq_len=2048),
    "transformer_11m": TransformerParams(hidden_dim=96, n_layers=8, n_heads=4),
}


def _lm_batches(vocab: int, batch: int, seq_len: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "input_ids": jnp.asarray(rng.integers(0, vocab, (batch, seq_len + 1)), jnp.int32),
            "loss_mask": jnp.ones((batch, seq_len + 1), bool),
        }
        for _ in range(2)
    ]


def bench(
    name: str, params: TransformerParams, *, batch: int, seq_len: int, steps: int, precision: str, devices: int = 1
) -> dict:
    state, step = build_step(params, batch=batch, precision=precision, devices=devices)
    r = time_step(state, step, _lm_batches(params.vocab_size, batch, seq_len), steps)
    med = r["step_s_median"]
    out = {
        "model": name,
        "precision": precision,
        "devices": devices,
        "batch": batch,
        "seq_len": seq_len,
        **r,
        "tokens_per_s": round(batch * seq_len / med, 1),
        "model_gflop_per_s": round(6 * r["params"] * batch * seq_len / med / 1e9, 2),
    }
    return out


def compile_depth(n_layers: int) -> dict:
    state, step = build_step(TransformerParams(hidden_dim=96, n_layers=n_layers, n_heads=4), batch=8)
    t0 = time.perf_counter()
    step.lower(state, _lm_batches(50432, 8, 256)[0]).compile()
    compile_s = round(time.perf_counter() - t0, 3)
    return {"model": f"compile_depth_L{n_layers}", "n_layers": n_layers, "compile_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="one of: " + ", ".join([*PRESETS, "compile_depth"]))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="data-parallel over this many devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N "
        "splits the cores into N devices, which runs XLA:CPU's single-threaded reductions in parallel)",
    )
    args = ap.parse_args()
    for name, params in PRESETS.items():
        if args.only in (None, name):
            r = bench(
                name,
                params,
                batch=args.batch,
                seq_len=args.seq_len,
                steps=args.steps,
                precision=args.precision,
                devices=args.devices,
            )
            print(json.dumps(r), flush=True)
    if args.only in (None, "compile_depth"):
        for n in (2, 24):
            print(json.dumps(compile_depth(n)), flush=True)


if __name__ == "__main__":
    main()
