"""Stable-diffusion UNet speed: train step and sampling, JAX beside diffusers' PyTorch ``UNet2DModel``.

    python benchmarks/stable_diffusion.py                   # preset [128, 256, 512, 1024] at 64x64 + tiny, CPU
    python benchmarks/stable_diffusion.py --configs tiny --batch 8 --steps 5

For each configuration, prints one JSON line with:
  * ``jax_step_s``: one jitted train step of ``stable_diffusion`` (unconditional UNet, flow matching, MSE, AdamW;
    the project's ``make_train_step``), median of ``--steps`` after compile and one warm-up;
  * ``jax_sample_s_per_image``: ``--sample_steps`` denoising steps for ``--batch`` images in one jit
    (``sample_images``), divided by the batch;
  * ``torch_step_s`` / ``torch_sample_s_per_image``: the same with diffusers' ``UNet2DModel`` of the same widths
    (``block_out_channels = channels``, 2 layers per block, attention blocks from level 2 as the own UNet's
    self-attention, ``sample_size = image_size``), forward + MSE + backward + ``torch.optim.AdamW`` step, and
    a ``torch.no_grad`` sampling loop (x -= v / steps); timed in the same run so machine load cancels out;
  * ``speedup_step`` / ``speedup_sample``: torch time / JAX time (> 1: JAX faster).
The two UNets are not the same network (diffusers' blocks differ in detail: resnet time projections, attention
heads, up-block depth); the parameter counts are printed beside the times. torch / diffusers are test-only
dependencies and are imported only here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import build_step, time_step
from vla_foundry_jax.models import stable_diffusion as sd
from vla_foundry_jax.params.model_params import NoiseSchedulerParams, StableDiffusionParams, UNetParams

CONFIGS = {
    "preset64": ([128, 256, 512, 1024], 64),  # gin_configs/stable_diffusion.gin widths at 64x64
    "tiny": ([16, 32, 32], 16),  # gin_configs/sd_quickstart.gin's UNet
}


def sd_params(channels: list[int], size: int) -> StableDiffusionParams:
    return StableDiffusionParams(
        unet=UNetParams(channels=channels, image_size=size, time_emb_dim=max(32, channels[0] * 2), text_emb_dim=0),
        noise_scheduler=NoiseSchedulerParams(num_timesteps=1000),
        use_flow_matching_scheduler=True,
    )


def bench_jax(params: StableDiffusionParams, batch: int, steps: int, sample_steps: int) -> dict:
    size = params.unet.image_size
    state, step = build_step(params, batch=batch)
    rng = np.random.default_rng(0)
    batches = [{"pixel_values": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)} for _ in range(2)]
    out = time_step(state, step, batches, steps)
    from flax import nnx

    from vla_foundry_jax.models import build_model

    model = build_model(params, rngs=nnx.Rngs(0))
    key = jax.random.PRNGKey(0)
    sd.sample_images(model, None, key, num_steps=sample_steps, batch_size=batch).block_until_ready()  # compile
    t0 = time.perf_counter()
    sd.sample_images(model, None, key, num_steps=sample_steps, batch_size=batch).block_until_ready()
    return {
        "jax_step_s": out["step_s_median"],
        "jax_compile_s": out["compile_s"],
        "jax_params": out["params"],
        "jax_sample_s_per_image": round((time.perf_counter() - t0) / batch, 4),
    }


def bench_torch(channels: list[int], size: int, batch: int, steps: int, sample_steps: int) -> dict:
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    n = len(channels)
    down = tuple("AttnDownBlock2D" if i >= 2 else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if (n - 1 - i) >= 2 else "UpBlock2D" for i in range(n))
    model = UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=tuple(channels),
        down_block_types=down, up_block_types=up, norm_num_groups=8,
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 3, size, size) * 2 - 1

    def train_step() -> None:
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        s = (t.float() / 1000)[:, None, None, None]
        out = model((x0 + s * (noise - x0)).clamp(-1.5, 1.5), t).sample
        loss = torch.nn.functional.mse_loss(out, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        x = torch.randn(batch, 3, size, size)
        for t in range(999, -1, -max(1, 1000 // sample_steps)):
            x = (x - model(x, torch.full((batch,), t)).sample * max(1, 1000 // sample_steps) / 1000).clamp(-1.5, 1.5)
        sample_s = time.perf_counter() - t0
    return {
        "torch_step_s": round(float(np.median(times)), 4),
        "torch_params": sum(p.numel() for p in model.parameters()),
        "torch_sample_s_per_image": round(sample_s / batch, 4),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (median)")
    parser.add_argument("--sample_steps", type=int, default=10, help="denoising steps of the sampling timing")
    parser.add_argument("--no_torch", action="store_true")
    args = parser.parse_args()
    for name in args.configs:
        channels, size = CONFIGS[name]
        row = {"config": name, "channels": channels, "image_size": size, "batch": args.batch}
        row |= {"device": jax.devices()[0].platform, "sample_steps": args.sample_steps}
        row |= bench_jax(sd_params(channels, size), args.batch, args.steps, args.sample_steps)
        if not args.no_torch:
            row |= bench_torch(channels, size, args.batch, args.steps, args.sample_steps)
            row["speedup_step"] = round(row["torch_step_s"] / row["jax_step_s"], 3)
            row["speedup_sample"] = round(row["torch_sample_s_per_image"] / row["jax_sample_s_per_image"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
