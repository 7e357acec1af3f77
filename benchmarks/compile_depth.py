"""Compile time against depth for every scanned model family: n_layers 2 vs 24 (target: within 1.5x).

    python benchmarks/compile_depth.py                        # all families
    python benchmarks/compile_depth.py --families transformer,vit --depths 2,24

Families: ``transformer`` and ``hf_decoder`` (a Llama config; train step with AdamW), ``vit`` and ``hf_vision``
(a SigLIP vision tower; jitted forward + backward of ``mean(out^2)``), ``diffusion_policy`` (vit_backbone and
denoiser both at the given depth; train step). Narrow widths, so the figure is about the graph, not the maths.
Each compile runs in a fresh process (no cache shared between depths). Prints one JSON line per family with the
compile seconds at each depth and ``ratio`` (deepest / shallowest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("transformer", "hf_decoder", "vit", "hf_vision", "diffusion_policy")


def _grad_step(model, x):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x):
        return jax.value_and_grad(lambda s: jnp.mean(jnp.square(nnx.merge(graphdef, s)(x))))(state)

    return step.lower(state, x)


def lower(family: str, L: int, tmp: str):
    """The lowered (not yet compiled) step of ``family`` at depth ``L``."""
    import numpy as np

    from vla_foundry_jax.params import TransformerHFParams, TransformerParams
    from vla_foundry_jax.params.model_params import ViTParams

    from common import build_step

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 33)).astype(np.int32)
    lm_batch = {"input_ids": ids, "loss_mask": np.ones(ids.shape, bool)}
    if family == "transformer":
        state, step = build_step(TransformerParams(hidden_dim=32, n_layers=L, n_heads=2, vocab_size=256), batch=2)
        return step.lower(state, lm_batch)
    if family == "hf_decoder":
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=2
        )
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
        state, step = build_step(TransformerHFParams(hf_pretrained=tmp), batch=2)
        return step.lower(state, lm_batch)
    images = rng.uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
    if family == "vit":
        from flax import nnx

        from vla_foundry_jax.models.vit import ViT

        vit = ViTParams(img_size=28, patch_size=14, hidden_dim=32, inter_dim=64, n_heads=2, n_layers=L)
        return _grad_step(ViT(vit, rngs=nnx.Rngs(0)), images)
    if family == "hf_vision":
        import transformers
        from flax import nnx

        from vla_foundry_jax.models import build_model
        from vla_foundry_jax.params.model_params import ViTHFParams

        cfg = transformers.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=L,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        transformers.SiglipVisionModel(cfg).save_pretrained(tmp)
        model = build_model(ViTHFParams(hf_pretrained=tmp, hidden_dim=32), rngs=nnx.Rngs(0), load_weights=False)
        return _grad_step(model, images)
    if family == "diffusion_policy":
        sys.path.insert(0, HERE)
        from compare import _policy_batch

        from vla_foundry_jax.params.model_params import DiffusionPolicyParams, ViTBackboneParams

        params = DiffusionPolicyParams(
            vision_language_backbone=ViTBackboneParams(
                img_size=28, patch_size=14, hidden_dim=32, inter_dim=64, n_heads=2, n_layers=L
            ),
            transformer=TransformerParams(hidden_dim=32, n_layers=L, n_heads=2, is_causal=False),
            use_flow_matching_scheduler=True,
            action_dim=7,
            proprioception_dim=7,
        )
        state, step = build_step(params, batch=2)
        return step.lower(state, _policy_batch(2, 2, 28, 0))
    raise KeyError(family)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--depths", default="2,24")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "family:depth" in this process
    args = ap.parse_args()
    if args.one:
        family, L = args.one.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            lowered = lower(family, int(L), tmp)
            t0 = time.perf_counter()
            lowered.compile()
        print(f"COMPILE_S {time.perf_counter() - t0:.3f}")
        return
    depths = [int(d) for d in args.depths.split(",")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    for family in [f for f in args.families.split(",") if f]:
        if family not in FAMILIES:
            sys.exit(f"error: unknown family {family!r}; choose from {list(FAMILIES)}")
        row = {"family": family}
        for L in depths:
            cmd = [sys.executable, os.path.abspath(__file__), f"--one={family}:{L}"]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True).stdout
            found = [line.split()[1] for line in out.splitlines() if line.startswith("COMPILE_S ")]
            row[f"compile_s_L{L}"] = float(found[-1]) if found else None
        first, last = row[f"compile_s_L{depths[0]}"], row[f"compile_s_L{depths[-1]}"]
        row["ratio"] = round(last / first, 2) if first and last else None
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
