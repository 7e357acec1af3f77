"""vlm_11m train step on this machine: ``python benchmarks/vlm.py`` (vit_tiny + transformer_11m, batch 4 x 512).

Prints one JSON line (step time, tokens/s, peak host RSS). Against PyTorch in the same run: benchmarks/compare.py.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from vla_foundry_jax.models.vlm import image_tokens_per_image
from vla_foundry_jax.params import TransformerParams, ViTParams, VLMParams

from common import build_step, time_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    vit = ViTParams(img_size=224, patch_size=14, hidden_dim=64, inter_dim=256, n_heads=4, n_layers=4)
    lm = TransformerParams(hidden_dim=96, n_layers=8, n_heads=4, vocab_size=50432)
    params = VLMParams(vit=vit, transformer=lm, image_token_id=50431)
    k = image_tokens_per_image(params)  # 256
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50000, (args.batch, args.seq_len + 1)).astype(np.int32)
    ids[:, :k] = params.image_token_id
    batch = {
        "input_ids": jnp.asarray(ids),
        "loss_mask": jnp.asarray(ids != params.image_token_id),
        "pixel_values": jnp.asarray(rng.normal(size=(args.batch, 1, 224, 224, 3)).astype(np.float32)),
    }
    state, step = build_step(params, batch=args.batch, precision=args.precision)
    r = time_step(state, step, [batch], args.steps)
    tps = args.batch * args.seq_len / r["step_s_median"]
    print(
        json.dumps(
            {
                "model": "vlm_11m",
                "batch": args.batch,
                "seq_len": args.seq_len,
                "precision": args.precision,
                **r,
                "tokens_per_s": round(tps, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
