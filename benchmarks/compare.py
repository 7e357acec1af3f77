"""Same-run speed against the PyTorch original: our jitted step and a PyTorch step of the same model, interleaved.

    python benchmarks/compare.py                                   # every workload, 3 rounds x 3 steps
    python benchmarks/compare.py --workloads=vit_tiny,transformer_11m --rounds=5 --steps=5
    python benchmarks/compare.py --quick --workloads=transformer_11m  # scaled-down shapes, CI time

Each workload runs in its own subprocess (so its peak host memory is its own). There both sides are built and
warmed up (compile / first step), then ``--rounds`` rounds alternate ``--steps`` timed steps of ours with
``--steps`` timed steps of PyTorch (A B A B ...), so machine load drifts cancel out of the per-round ratio.
One table row per workload: ours and PyTorch median seconds per step (median over rounds of the per-round median),
and ``torch / ours`` (> 1: ours faster) as the min and median of the per-round ratios. Also printed: our compile
time and our peak host RSS after the first step (before PyTorch is built). Threads are set equal on both sides:
``torch.set_num_threads(N)`` and XLA:CPU's intra-op pool (``--threads``, default: all cores). Both sides run under
the host allocator setting that importing ``vla_foundry_jax`` applies on CPU (``host_memory``; process-wide). Our
XLA:CPU worker threads are pinned one per core, as the training loop and the policy server pin them (``cpu_threads``);
PyTorch's threads keep its defaults.

The PyTorch side (benchmarks/torch_original.py) follows the original's numerics: its decoder / ViT / VLM / policy /
UNet, float32, its loss and its AdamW (two groups, warmup + cosine). ``--json`` prints one JSON line per workload
instead of the table. torch is a benchmark dependency only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (description, full shapes, quick shapes)
WORKLOADS = {
    "transformer_11m": "train step, H96 L8 nh4 V50432",
    "transformer_100m": "train step, H512 L12 nh8 V50432, post-embed norm",
    "hf_llama_11m": "train step, HF LlamaForCausalLM vs our transformer_hf (H96 L8 nh4 I256 V50432)",
    "vit_tiny": "fwd + bwd + AdamW of mean(vit(x)^2), 224px, patch 14",
    "vlm_11m": "train step, vit_tiny + transformer_11m, 256 image tokens",
    "diffusion_policy": "train step, vit_tiny backbone x 2 cameras, denoiser H64 L2 nh2 non-causal, Ta 16",
    "stable_diffusion": "train step, preset UNet [128,256,512,1024] at 64x64, flow matching",
    "policy_sampling": "sample actions at batch 1 (latency), the policy server's sampler, 10 flow steps",
}


def shapes(name: str, quick: bool) -> dict[str, Any]:
    """Batch / size figures of a workload (``quick``: scaled down to run in seconds)."""
    full = {
        "transformer_11m": {"batch": 8, "seq": 256},
        "transformer_100m": {"batch": 4, "seq": 256},
        "hf_llama_11m": {"batch": 8, "seq": 256},
        "vit_tiny": {"batch": 8, "img": 224},
        "vlm_11m": {"batch": 4, "seq": 512, "img": 224},
        "diffusion_policy": {"batch": 8, "img": 224, "cams": 2},
        "stable_diffusion": {"batch": 4, "channels": [128, 256, 512, 1024], "img": 64},
        "policy_sampling": {"batch": 1, "img": 224, "cams": 2, "flow_steps": 10},
    }[name]
    if quick:  # one or two layers (see _lm / _vit), tiny images and sequences
        small = {"batch": 2, "seq": 32, "img": 28, "channels": [16, 32, 32, 32], "flow_steps": 2}
        full = {k: small.get(k, v) for k, v in full.items()}
        if name == "stable_diffusion":
            full["img"] = 16
        if name == "policy_sampling":
            full["batch"] = 1
    return full


# ------------------------------------------------------------------------------------------------ our side


def _lm(name: str, quick: bool):
    from vla_foundry_jax.params import TransformerParams

    if name == "transformer_100m":
        return TransformerParams(hidden_dim=512, n_layers=2 if quick else 12, n_heads=8, post_embed_norm=True)
    return TransformerParams(hidden_dim=96, n_layers=2 if quick else 8, n_heads=4)


def _vit(img: int, quick: bool):
    from vla_foundry_jax.params.model_params import ViTParams

    return ViTParams(img_size=img, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=1 if quick else 4)


def _policy_params(img: int, quick: bool):
    from vla_foundry_jax.params.model_params import (
        DiffusionPolicyParams,
        NoiseSchedulerParams,
        TransformerParams,
        ViTBackboneParams,
    )

    v = _vit(img, quick)
    return DiffusionPolicyParams(
        vision_language_backbone=ViTBackboneParams(
            img_size=img, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=v.n_layers
        ),
        transformer=TransformerParams(hidden_dim=64, n_layers=2, n_heads=2, is_causal=False, max_seq_len=2048),
        noise_scheduler=NoiseSchedulerParams(num_timesteps=1000, clamp_range=(-3.0, 3.0)),
        use_flow_matching_scheduler=True,
        action_dim=7,
        proprioception_dim=7,
    )


def _policy_batch(batch: int, cams: int, img: int, seed: int):
    import numpy as np

    r = np.random.default_rng(seed)
    past = np.zeros((batch, 16), bool)
    past[:, :1] = True
    return {
        "input_ids": r.integers(0, 100, (batch, 16)).astype(np.int32),
        "attention_mask": np.ones((batch, 16), np.int32),
        "pixel_values": r.uniform(-1, 1, (batch, cams, img, img, 3)).astype(np.float32),
        "attention_mask_images": np.ones((batch, cams), bool),
        "actions": r.uniform(-1, 1, (batch, 16, 7)).astype(np.float32),
        "past_mask": past,
        "future_mask": ~past,
        "proprioception": r.standard_normal((batch, 2, 7)).astype(np.float32),
    }


def _train_runner(params, batch: dict, bsz: int) -> tuple[Callable[[], None], dict]:
    """(run one step, info) for the project's jitted train step of ``params``."""
    import jax

    from common import build_step

    state, step = build_step(params, batch=bsz)
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    info = {"compile_s": round(time.perf_counter() - t0, 2)}
    holder = [state]

    def run() -> None:
        holder[0], m = compiled(holder[0], batch)
        jax.block_until_ready(m["loss"])

    return run, info


def ours(name: str, quick: bool, tmp: str) -> tuple[Callable[[], None], dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sh = shapes(name, quick)
    rng = np.random.default_rng(0)
    if name in ("transformer_11m", "transformer_100m"):
        p = _lm(name, quick)
        ids = rng.integers(0, p.vocab_size, (sh["batch"], sh["seq"] + 1)).astype(np.int32)
        return _train_runner(p, {"input_ids": ids, "loss_mask": np.ones(ids.shape, bool)}, sh["batch"])
    if name == "hf_llama_11m":
        from vla_foundry_jax.params import TransformerHFParams

        ids = rng.integers(0, 50432, (sh["batch"], sh["seq"] + 1)).astype(np.int32)
        batch = {"input_ids": ids, "loss_mask": np.ones(ids.shape, bool)}
        return _train_runner(TransformerHFParams(hf_pretrained=tmp), batch, sh["batch"])
    if name == "vlm_11m":
        from vla_foundry_jax.models.vlm import image_tokens_per_image
        from vla_foundry_jax.params import VLMParams

        p = VLMParams(vit=_vit(sh["img"], quick), transformer=_lm(name, quick), image_token_id=50431)
        k = image_tokens_per_image(p)
        ids = rng.integers(0, 50000, (sh["batch"], sh["seq"] + 1)).astype(np.int32)
        ids[:, :k] = p.image_token_id
        pix = rng.uniform(-1, 1, (sh["batch"], 1, sh["img"], sh["img"], 3)).astype(np.float32)
        return _train_runner(
            p, {"input_ids": ids, "loss_mask": ids != p.image_token_id, "pixel_values": pix}, sh["batch"]
        )
    if name == "diffusion_policy":
        p = _policy_params(sh["img"], quick)
        return _train_runner(p, _policy_batch(sh["batch"], sh["cams"], sh["img"], 0), sh["batch"])
    if name == "stable_diffusion":
        from vla_foundry_jax.params.model_params import NoiseSchedulerParams, StableDiffusionParams, UNetParams

        c = sh["channels"]
        p = StableDiffusionParams(
            unet=UNetParams(channels=c, image_size=sh["img"], time_emb_dim=max(32, c[0] * 2), text_emb_dim=0),
            noise_scheduler=NoiseSchedulerParams(num_timesteps=1000),
            use_flow_matching_scheduler=True,
        )
        pix = rng.uniform(-1, 1, (sh["batch"], sh["img"], sh["img"], 3)).astype(np.float32)
        return _train_runner(p, {"pixel_values": pix}, sh["batch"])
    if name == "vit_tiny":
        import optax
        from flax import nnx

        from vla_foundry_jax.models.vit import ViT

        model = ViT(_vit(sh["img"], quick), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        opt = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
        x = jnp.asarray(rng.uniform(-1, 1, (sh["batch"], sh["img"], sh["img"], 3)), jnp.float32)

        @jax.jit
        def step(params, opt_state, x):
            def loss(p):
                return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x)))

            val, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, val

        holder = [params, opt.init(params)]
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*holder, x).compile()
        info = {"compile_s": round(time.perf_counter() - t0, 2)}

        def run() -> None:
            holder[0], holder[1], val = compiled(*holder, x)
            jax.block_until_ready(val)

        return run, info
    if name == "policy_sampling":
        from flax import nnx

        from vla_foundry_jax.models import build_model
        from vla_foundry_jax.models.diffusion_policy import action_sampler

        model = build_model(_policy_params(sh["img"], quick), rngs=nnx.Rngs(0))
        one = _policy_batch(1, sh["cams"], sh["img"], 2)
        key = jax.random.PRNGKey(0)
        sample = action_sampler(model, num_inference_steps=sh["flow_steps"])  # built once, as the policy server does
        t0 = time.perf_counter()
        jax.block_until_ready(sample(one, key))
        info = {"compile_s": round(time.perf_counter() - t0, 2)}

        def run() -> None:
            jax.block_until_ready(sample(one, key))

        return run, info
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------ PyTorch side


def theirs(name: str, quick: bool, tmp: str) -> Callable[[], None]:
    import numpy as np
    import torch
    import torch_original as to

    torch.manual_seed(0)
    sh = shapes(name, quick)
    rng = np.random.default_rng(0)

    def vit(img: int) -> to.ViT:
        return to.ViT(img, 14, 64, 256, 4, 1 if quick else 4)

    if name in ("transformer_11m", "transformer_100m", "hf_llama_11m"):
        ids = torch.from_numpy(rng.integers(0, 50432, (sh["batch"], sh["seq"] + 1))).long()
        if name == "hf_llama_11m":
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").train()

            def loss_fn(ids):
                logits = model(input_ids=ids[:, :-1]).logits
                return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

        else:
            p = _lm(name, quick)
            model = to.Transformer(p.hidden_dim, p.n_layers, p.n_heads, post_embed_norm=p.post_embed_norm)

            def loss_fn(ids):
                return to.lm_loss(model, ids)

        step = to.train_step_fn(model, loss_fn)
        return lambda: step(ids)
    if name == "vit_tiny":
        model = vit(sh["img"])
        x = torch.rand(sh["batch"], 3, sh["img"], sh["img"]) * 2 - 1
        step = to.train_step_fn(model, lambda x: model(x).square().mean())
        return lambda: step(x)
    if name == "vlm_11m":
        p = _lm(name, quick)
        model = to.VLM(vit(sh["img"]), to.Transformer(p.hidden_dim, p.n_layers, p.n_heads), 64, p.hidden_dim, 50431)
        ids = rng.integers(0, 50000, (sh["batch"], sh["seq"] + 1))
        ids[:, : (sh["img"] // 14) ** 2] = 50431
        ids = torch.from_numpy(ids).long()
        pix = torch.rand(sh["batch"], 3, sh["img"], sh["img"]) * 2 - 1
        step = to.train_step_fn(model, lambda i, x: to.vlm_loss(model, i, x))
        return lambda: step(ids, pix)
    if name in ("diffusion_policy", "policy_sampling"):
        denoiser = to.Transformer(64, 2, 2, vocab=0, causal=False)
        model = to.DiffusionPolicy(vit(sh["img"]), denoiser, 64, 64, 7, 7)
        b = {k: torch.from_numpy(v) for k, v in _policy_batch(sh["batch"], sh["cams"], sh["img"], 0).items()}
        pix = b["pixel_values"].permute(0, 1, 4, 2, 3).contiguous()
        if name == "policy_sampling":
            model.eval()
            return lambda: model.generate_actions(
                pix, b["actions"], b["past_mask"], b["proprioception"], sh["flow_steps"]
            )
        step = to.train_step_fn(model, model.loss)
        return lambda: step(pix, b["actions"], b["future_mask"], b["proprioception"])
    if name == "stable_diffusion":
        c = sh["channels"]
        model = to.UNet(c, max(32, c[0] * 2))
        x0 = torch.rand(sh["batch"], 3, sh["img"], sh["img"]) * 2 - 1
        step = to.train_step_fn(model, lambda x: to.unet_flow_loss(model, x))
        return lambda: step(x0)
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------ driver


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _time(fn: Callable[[], None], steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _median(times)


def _llama_config(tmp: str, quick: bool) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50432,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2 if quick else 8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)


def run_one(name: str, *, quick: bool, rounds: int, steps: int, threads: int) -> dict[str, Any]:
    """Build both sides of ``name`` in this process, warm them up, then interleave ``rounds`` timed rounds."""
    import torch

    import vla_foundry_jax  # noqa: F401  (the import sets the host allocator, process-wide: PyTorch runs under it too)
    from vla_foundry_jax.cpu_threads import pin_xla_cpu_workers

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "hf_llama_11m":
            _llama_config(tmp, quick)
        run_ours, info = ours(name, quick, tmp)
        pin_xla_cpu_workers()  # as the training loop and the policy server do on the CPU backend
        run_ours()
        ours_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        run_torch = theirs(name, quick, tmp)
        run_torch()
    per_round = []
    for _ in range(rounds):
        a = _time(run_ours, steps)
        b = _time(run_torch, steps)
        per_round.append((a, b))
    ratios = [b / a for a, b in per_round]
    return {
        "workload": name,
        "shapes": shapes(name, quick),
        "threads": threads,
        "rounds": rounds,
        "steps": steps,
        "ours_s": round(_median([a for a, _ in per_round]), 4),
        "torch_s": round(_median([b for _, b in per_round]), 4),
        "ratio_min": round(min(ratios), 2),
        "ratio_median": round(_median(ratios), 2),
        "ours_compile_s": info["compile_s"],
        "ours_peak_rss_mb": round(ours_rss_mb),
    }


def child_env(threads: int) -> dict[str, str]:
    """Environment of a workload's process: XLA:CPU's thread pool sized like torch's."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    env["XLA_FLAGS"] = flags.strip()
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    return env


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| workload | ours s/step | PyTorch original s/step | torch/ours min | torch/ours median | compile s "
    head += "| peak RSS MB |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | error: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['workload']} | {r['ours_s']:.4f} | {r['torch_s']:.4f} | {r['ratio_min']:.2f}x | "
            f"{r['ratio_median']:.2f}x | {r['ours_compile_s']} | {r['ours_peak_rss_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="scaled-down shapes (seconds per workload)")
    ap.add_argument("--json", action="store_true", help="one JSON line per workload instead of the table")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one workload in this process
    args = ap.parse_args()
    if args.one:
        r = run_one(args.one, quick=args.quick, rounds=args.rounds, steps=args.steps, threads=args.threads)
        print("RESULT " + json.dumps(r), flush=True)
        return
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}", file=sys.stderr)
        sys.exit(2)
    rows = []
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), f"--one={name}", f"--rounds={args.rounds}"]
        cmd += [f"--steps={args.steps}", f"--threads={args.threads}"] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, env=child_env(args.threads), capture_output=True, text=True)
        found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(found[-1]) if found else {"workload": name, "error": done.stderr.strip().splitlines()[-1:]}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    if not args.json:
        print(format_table(rows))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
