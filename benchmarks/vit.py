"""Forward + backward speed of the from-scratch ViT (vit_tiny preset by default) on this machine.

    python benchmarks/vit.py                       # vit_tiny, batch 8, 224x224x3, float32
    python benchmarks/vit.py --batch 16 --steps 20 --dtype bfloat16

Prints one JSON line: compile_s, step_s_median (one jitted forward + backward of ``mean(vit(x)^2)`` w.r.t. every
parameter), images_per_s, and ``speedup_vs_torch_same_run`` (> 1 means faster than the original): against a
PyTorch re-implementation of the original's ViT (same shapes, same loss, torch's default threads) timed in this
run, so that machine load cancels out (skipped with ``--no_torch`` or when torch is not installed; torch is never
needed by the library). With the optimizer and interleaved rounds: benchmarks/compare.py.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.models.vit import ViT
from vla_foundry_jax.params.model_params import ViTParams

PRESETS = {
    "vit_tiny": ViTParams(img_size=224, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=4),
}


def bench(name: str, *, batch: int, steps: int, dtype: str, remat_policy: str | None) -> dict:
    params = PRESETS[name]
    model = ViT(params, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), remat_policy=remat_policy)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, images):
        def loss(s):
            return jnp.mean(jnp.square(nnx.merge(graphdef, s)(images).astype(jnp.float32)))

        return jax.value_and_grad(loss)(state)

    rng = np.random.default_rng(0)
    s = params.img_size
    batches = [jnp.asarray(rng.uniform(-1, 1, (batch, s, s, 3)), jnp.float32) for _ in range(2)]
    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, batches[0]))
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, batches[i % 2]))
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    out = {
        "model": name,
        "dtype": dtype,
        "batch": batch,
        "img_size": s,
        "params": sum(int(x.size) for x in jax.tree.leaves(state)),
        "backend": jax.default_backend(),
        "compile_s": round(compile_s, 3),
        "step_s_median": round(med, 4),
        "images_per_s": round(batch / med, 1),
    }
    return out


def torch_step_s(params: ViTParams, *, batch: int, steps: int) -> float | None:
    """Median forward + backward seconds of a PyTorch re-implementation of the original's ViT (eval mode)."""
    try:
        import torch
    except ImportError:
        return None
    nn = torch.nn
    H, nh, p = params.hidden_dim, params.n_heads, params.patch_size
    n_p = (params.img_size // p) ** 2

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(H, eps=params.ln_eps), nn.LayerNorm(H, eps=params.ln_eps)
            self.qkv_proj, self.out_proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
            self.fc1, self.fc2 = nn.Linear(H, params.inter_dim), nn.Linear(params.inter_dim, H)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in self.qkv_proj(self.ln1(x)).split(C, 2))
            y = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
            x = x + self.out_proj(y)
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class TorchViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, H, p, p)
            self.pos = nn.Parameter(torch.rand(1, n_p, H))
            self.blocks = nn.ModuleList([Block() for _ in range(params.n_layers)])
            self.layer_norm = nn.LayerNorm(H, eps=params.ln_eps)

        def forward(self, x):
            x = self.conv(x).flatten(2).transpose(1, 2) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.layer_norm(x)

    torch.manual_seed(0)
    model = TorchViT().eval()
    images = torch.rand(batch, 3, params.img_size, params.img_size) * 2 - 1
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(images).square().mean().backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat_policy", default=None)
    ap.add_argument("--no_torch", action="store_true", help="skip the same-run PyTorch timing")
    args = ap.parse_args()
    res = bench(args.model, batch=args.batch, steps=args.steps, dtype=args.dtype, remat_policy=args.remat_policy)
    if not args.no_torch and jax.default_backend() == "cpu":
        ref = torch_step_s(PRESETS[args.model], batch=args.batch, steps=args.steps)
        if ref is not None:
            res["torch_same_run_step_s"] = round(ref, 4)
            res["speedup_vs_torch_same_run"] = round(ref / res["step_s_median"], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
