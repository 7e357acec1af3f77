"""Tokens/s and model FLOPs utilisation of the train step on the present accelerator.

    python benchmarks/mfu.py                                   # transformer_1b, vlm_1b, vla_diffusion_1b
    python benchmarks/mfu.py --models transformer_1b --batch 8 --seq_len 2048 --steps 10
    python benchmarks/mfu.py --cpu_small                       # scaled-down configs that run in seconds on CPU

Each model is the preset's architecture (gin_configs/transformer_1b.gin, vlm_1b.gin = transformer_1b + the
PaliGemma-sized ViT, vla_diffusion_1b.gin = a transformer_100m denoiser on a vlm_1b foundry backbone) trained with
the project's jitted step at ``--precision`` (default amp_bfloat16: float32 parameters and optimizer state,
bfloat16 compute). Model FLOPs per step are XLA's count of the compiled step (``cost_analysis()["flops"]``; no
rematerialisation is configured here, so it equals the model's FLOPs); MFU = FLOPs / step time / peak FLOP/s
of the device (a table of bf16 dense peaks by device kind; ``--peak_tflops`` overrides, e.g. on an unknown device;
none for CPU). Prints one JSON line per model; ``tokens_per_s`` counts the language tokens (or action-sample rows
for the policy) per second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vla_foundry_jax.params import TrainExperimentParams, TransformerParams, ViTParams, VLMParams
from vla_foundry_jax.params.model_params import DiffusionPolicyParams, NoiseSchedulerParams, VLMFoundryBackboneParams

from common import build_step

# bf16 dense peak FLOP/s per chip, by substrings of jax's device_kind (vendor datasheets).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v6": 918e12, "TPU v5p": 459e12}
PEAK_BF16 |= {"TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}


def presets(small: bool) -> dict[str, tuple]:
    """name -> (params builder, batch builder) for the full presets or their CPU-sized versions."""
    if small:
        lm = TransformerParams(hidden_dim=64, n_layers=2, n_heads=4, vocab_size=1024, max_seq_len=256)
        vit = ViTParams(img_size=28, patch_size=14, hidden_dim=32, inter_dim=64, n_heads=2, n_layers=1)
        den = TransformerParams(hidden_dim=32, n_layers=1, n_heads=2, post_embed_norm=True, is_causal=False)
    else:
        lm = TransformerParams(hidden_dim=2048, n_layers=24, n_heads=16, vocab_size=49280)
        vit = ViTParams(img_size=224, patch_size=14, hidden_dim=1152, inter_dim=4304, n_heads=16, n_layers=27)
        den = TransformerParams(hidden_dim=512, n_layers=12, n_heads=8, post_embed_norm=True, is_causal=False)
    vlm = VLMParams(vit=vit, transformer=lm, image_token_id=lm.vocab_size - 1)
    return {
        "transformer_1b": lm if small else lm.replace(vocab_size=50432),
        "vlm_1b": vlm,
        "vla_diffusion_1b": (vlm, den),
    }


def lm_batch(vocab: int, batch: int, seq: int) -> dict:
    ids = np.random.default_rng(0).integers(0, vocab - 1, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones(ids.shape, bool)}


def vlm_batch(p: VLMParams, batch: int, seq: int) -> dict:
    from vla_foundry_jax.models.vlm import image_tokens_per_image

    b = lm_batch(p.transformer.vocab_size, batch, seq)
    b["input_ids"][:, : image_tokens_per_image(p)] = p.image_token_id
    b["loss_mask"] = b["input_ids"] != p.image_token_id
    s = p.vit.img_size
    b["pixel_values"] = np.random.default_rng(1).uniform(-1, 1, (batch, 1, s, s, 3)).astype(np.float32)
    return b


def policy(vlm: VLMParams, den: TransformerParams, run_dir: str, batch: int) -> tuple[DiffusionPolicyParams, dict]:
    """A diffusion policy on a ``vlm`` foundry backbone (its run files written to ``run_dir``) and a batch."""
    from vla_foundry_jax.models.vlm import image_tokens_per_image
    from vla_foundry_jax.training.loop import write_run_files

    write_run_files(run_dir, TrainExperimentParams(model=vlm), None)
    params = DiffusionPolicyParams(
        vision_language_backbone=VLMFoundryBackboneParams(
            vlm_experiment_dir=run_dir, num_vlm_layers_to_use=min(4, vlm.transformer.n_layers)
        ),
        transformer=den,
        noise_scheduler=NoiseSchedulerParams(num_timesteps=1000, clamp_range=(-3.0, 3.0)),
        use_flow_matching_scheduler=True,
        action_dim=7,
        proprioception_dim=7,
    )
    k = image_tokens_per_image(vlm)
    b = vlm_batch(vlm, batch, k + 16)
    ids = b["input_ids"][:, :-1]
    r = np.random.default_rng(2)
    past = np.zeros((batch, 16), bool)
    past[:, 0] = True
    b = {
        "input_ids": ids,
        "attention_mask": np.ones(ids.shape, np.int32),
        "pixel_values": b["pixel_values"],
        "attention_mask_images": np.ones((batch, 1), bool),
        "actions": r.uniform(-1, 1, (batch, 16, 7)).astype(np.float32),
        "past_mask": past,
        "future_mask": ~past,
        "proprioception": r.standard_normal((batch, 2, 7)).astype(np.float32),
    }
    return params, b


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


def measure(name: str, params, batch: dict, bsz: int, tokens: int, *, steps: int, precision: str, peak) -> dict:
    state, step = build_step(params, batch=bsz, precision=precision)
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    out = {
        "model": name,
        "device": jax.devices()[0].device_kind,
        "precision": precision,
        "batch": bsz,
        "compile_s": round(compile_s, 2),
        "step_s_median": round(sec, 4),
        "tokens_per_s": round(tokens / sec, 1),
        "model_tflops_per_step": round(flops / 1e12, 4),
        "achieved_tflop_per_s": round(flops / sec / 1e12, 3),
    }
    if peak:
        out["mfu"] = round(flops / sec / peak, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="transformer_1b,vlm_1b,vla_diffusion_1b")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (2 with --cpu_small)")
    ap.add_argument("--seq_len", type=int, default=None, help="LM sequence length; default 2048 (32 with --cpu_small)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="amp_bfloat16")
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--cpu_small", action="store_true", help="scaled-down configs (CPU, CI time)")
    args = ap.parse_args()
    small = args.cpu_small
    bsz = args.batch or (2 if small else 8)
    seq = args.seq_len or (32 if small else 2048)
    peak = peak_flops(args.peak_tflops)
    p = presets(small)
    for name in [m for m in args.models.split(",") if m]:
        if name not in p:
            sys.exit(f"error: unknown model {name!r}; choose from {sorted(p)}")
        kw = {"steps": args.steps, "precision": args.precision, "peak": peak}
        if name == "transformer_1b":
            r = measure(name, p[name], lm_batch(p[name].vocab_size, bsz, seq), bsz, bsz * seq, **kw)
        elif name == "vlm_1b":
            r = measure(name, p[name], vlm_batch(p[name], bsz, seq), bsz, bsz * seq, **kw)
        else:
            with tempfile.TemporaryDirectory() as run:
                params, b = policy(*p[name], run, bsz)
                r = measure(name, params, b, bsz, bsz * b["input_ids"].shape[1], **kw)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
