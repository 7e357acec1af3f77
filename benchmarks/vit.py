"""Forward + backward speed of the from-scratch ViT (vit_tiny preset by default) on this machine.

    python benchmarks/vit.py                       # vit_tiny, batch 8, 224x224x3, float32
    python benchmarks/vit.py --batch 16 --steps 20 --dtype bfloat16

Prints one JSON line: compile_s, step_s_median (one jitted forward + backward of ``mean(vit(x)^2)`` w.r.t. every
parameter), images_per_s and the ratio to the PyTorch original on the same machine class
(vit_tiny, batch 8, forward + backward: 0.056 s per batch; ratio > 1 means faster than the original).
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
TORCH_STEP_S = {("vit_tiny", 8): 0.056}


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
    ref = TORCH_STEP_S.get((name, batch))
    if ref is not None and dtype == "float32":
        out["pytorch_original_step_s"] = ref
        out["speedup_vs_pytorch_original"] = round(ref / med, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat_policy", default=None)
    args = ap.parse_args()
    res = bench(args.model, batch=args.batch, steps=args.steps, dtype=args.dtype, remat_policy=args.remat_policy)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
