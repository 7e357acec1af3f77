"""Train-step throughput and action-sampling latency of a tiny vit-backbone ``diffusion_policy`` on this machine.

    python benchmarks/policy.py                    # batch 8, float32, 10 flow steps for sampling
    python benchmarks/policy.py --batch 16 --precision amp_bfloat16 --steps 20

Model: ``vit_tiny`` backbone (224 x 224 images, 14 x 14 patches -> 256 tokens of width 64, 4 blocks) over
``--cameras`` cameras, ``transformer_tiny`` denoiser (H 64, L 2, nh 2) run non-causally, concat time conditioning,
flow matching with T = 1000; actions ``Ta = 16`` x ``A = 7``, proprioception ``2 x 7``. The train step is the
project's jitted step (AdamW, no EMA) on the global batch.

Prints one JSON line: compile_s, step_s_median, samples_per_s, peak host RSS, and the sampling figures
(``sample_compile_s``, ``sample_latency_ms_median`` for one ``sample_actions`` call at batch 1 with
``--flow_steps`` Euler steps, backbone once). Against PyTorch in the same run: benchmarks/compare.py.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from vla_foundry_jax.models.diffusion_policy import sample_actions
from vla_foundry_jax.params.model_params import (
    DiffusionPolicyParams,
    NoiseSchedulerParams,
    TransformerParams,
    ViTBackboneParams,
)

from common import build_step, time_step

TA, A, P, PAST = 16, 7, 7, 1


def policy_params() -> DiffusionPolicyParams:
    return DiffusionPolicyParams(
        vision_language_backbone=ViTBackboneParams(
            img_size=224, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=4
        ),
        transformer=TransformerParams(hidden_dim=64, n_layers=2, n_heads=2, is_causal=False, max_seq_len=2048),
        noise_scheduler=NoiseSchedulerParams(num_timesteps=1000, clamp_range=(-3.0, 3.0)),
        use_flow_matching_scheduler=True,
        action_dim=A,
        proprioception_dim=P,
    )


def make_batch(batch: int, cameras: int, seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    past = np.zeros((batch, TA), bool)
    past[:, :PAST] = True
    return {
        "input_ids": r.integers(0, 100, (batch, 16)).astype(np.int32),
        "attention_mask": np.ones((batch, 16), np.int32),
        "pixel_values": r.uniform(-1, 1, (batch, cameras, 224, 224, 3)).astype(np.float32),
        "attention_mask_images": np.ones((batch, cameras), bool),
        "actions": r.uniform(-1, 1, (batch, TA, A)).astype(np.float32),
        "past_mask": past,
        "future_mask": ~past,
        "proprioception": r.standard_normal((batch, PAST + 1, P)).astype(np.float32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cameras", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--flow_steps", type=int, default=10)
    ap.add_argument("--sample_calls", type=int, default=10)
    args = ap.parse_args()

    params = policy_params()
    state, step = build_step(params, batch=args.batch, precision=args.precision)
    batches = [{k: jax.numpy.asarray(v) for k, v in make_batch(args.batch, args.cameras, s).items()} for s in (0, 1)]
    out = {"device": str(jax.devices()[0].platform), "batch": args.batch, "cameras": args.cameras}
    out |= time_step(state, step, batches, args.steps)
    out["samples_per_s"] = round(args.batch / out["step_s_median"], 2)

    from flax import nnx

    from vla_foundry_jax.models import build_model

    model = build_model(params, rngs=nnx.Rngs(0))
    one = make_batch(1, args.cameras, 2)
    t0 = time.perf_counter()
    jax.block_until_ready(sample_actions(model, one, jax.random.PRNGKey(0), num_inference_steps=args.flow_steps))
    out["sample_compile_s"] = round(time.perf_counter() - t0, 3)
    times = []
    for i in range(args.sample_calls):
        t0 = time.perf_counter()
        jax.block_until_ready(sample_actions(model, one, jax.random.PRNGKey(i), num_inference_steps=args.flow_steps))
        times.append(time.perf_counter() - t0)
    out["flow_steps"] = args.flow_steps
    out["sample_latency_ms_median"] = round(1000 * float(np.median(times)), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
