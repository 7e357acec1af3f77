"""Qwen2.5-VL forward + backward, ours (JAX) vs HF PyTorch in the same run: ``python benchmarks/qwen_vl.py``.

A ~100M-parameter random Qwen2.5-VL (vision: 8 blocks of width 512, windowed attention with full attention at
blocks 3 and 7; LM: 8 Qwen2 layers of width 512, vocabulary 32000, untied), batch 4, two 448 x 448 images per
sample (1024 patches, 256 LM tokens each) plus 32 text tokens. The step is the gradient of the mean next-token
cross-entropy over the text targets with respect to every parameter (no optimizer). HF runs eager attention
(its per-window loop) in float32 on the CPU threads torch picks; ours runs the jitted step on the default JAX
device. Prints one JSON line with both medians and their ratio. ``--remat`` rematerialises every block on both sides
(ours ``nothing_saveable``, HF gradient checkpointing) for machines without the ~12 GB the plain step peaks at.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from vla_foundry_jax.models.build import build_model
from vla_foundry_jax.params.model_params import VLMHFParams

IMG, START, END = 31990, 31991, 31992
SIDE, PATCH, MERGE = 448, 14, 2


def hf_config() -> transformers.Qwen2_5_VLConfig:
    text = dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    )
    vision = dict(
        depth=8,
        hidden_size=512,
        intermediate_size=1536,
        num_heads=8,
        out_hidden_size=512,
        patch_size=PATCH,
        temporal_patch_size=2,
        spatial_merge_size=MERGE,
        window_size=112,
        fullatt_block_indexes=[3, 7],
    )
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMG,
        video_token_id=31993,
        vision_start_token_id=START,
        vision_end_token_id=END,
        tie_word_embeddings=False,
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    return cfg


def make_batch(batch: int, text: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids ``[B, S]``, flat pixel rows ``[B * 2 * 1024, 1176]``, grids ``[B * 2, 3]``."""
    rng = np.random.default_rng(seed)
    g = SIDE // PATCH
    per_image = (g // MERGE) ** 2
    half = text // 2
    rows = []
    for _ in range(batch):
        image = [START] + [IMG] * per_image + [END]
        rows.append(list(rng.integers(1, 31000, half)) + image + image + list(rng.integers(1, 31000, text - half)))
    ids = np.asarray(rows, np.int64)
    pixels = rng.standard_normal((batch * 2 * g * g, 3 * 2 * PATCH * PATCH)).astype(np.float32)
    grids = np.tile(np.asarray([[1, g, g]], np.int64), (batch * 2, 1))
    return ids, pixels, grids


def time_it(fn, steps: int) -> float:
    fn()  # warm-up (compile for JAX)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--remat",
        action="store_true",
        help="rematerialise every block on both sides (ours: nothing_saveable; HF: gradient checkpointing)",
    )
    args = ap.parse_args()
    ids, pixels, grids = make_batch(args.batch, args.text)
    targets_mask = (ids[:, 1:] != IMG) & (ids[:, 1:] != START) & (ids[:, 1:] != END)

    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config()).train()
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        remat = "nothing_saveable" if args.remat else None
        model = build_model(VLMHFParams(hf_pretrained=d), rngs=nnx.Rngs(0), remat_policy=remat)
    if args.remat:
        hf.gradient_checkpointing_enable()

    t_ids, t_pix, t_grid = torch.from_numpy(ids), torch.from_numpy(pixels), torch.from_numpy(grids)
    t_mm = torch.from_numpy((ids == IMG).astype(np.int64))
    t_tgt, t_mask = torch.from_numpy(ids[:, 1:]), torch.from_numpy(targets_mask)

    def torch_step() -> None:
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=t_ids, pixel_values=t_pix, image_grid_thw=t_grid, mm_token_type_ids=t_mm).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), t_tgt, reduction="none")
        ce[t_mask].mean().backward()

    graphdef, state = nnx.split(model)
    j_ids, j_pix, j_grid = jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(grids)
    j_tgt, j_mask = jnp.asarray(ids[:, 1:]), jnp.asarray(targets_mask)

    @jax.jit
    def grads(state):
        def loss(state):
            logits = nnx.merge(graphdef, state)(j_ids, j_pix, image_grid_thw=j_grid).logits[:, :-1]
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), j_tgt[..., None], axis=-1)[..., 0]
            return jnp.sum(ce * j_mask) / jnp.sum(j_mask)

        return jax.value_and_grad(loss)(state)

    ours_s = time_it(lambda: jax.block_until_ready(grads(state)), args.steps)
    print(json.dumps({"ours_s": round(ours_s, 3)}), flush=True)  # the torch side can take long on a small CPU
    torch_s = time_it(torch_step, args.steps)
    print(
        json.dumps(
            {
                "model": "qwen2_5_vl_random",
                "params": int(n_params),
                "batch": args.batch,
                "images_per_sample": 2,
                "image_side": SIDE,
                "seq_len": int(ids.shape[1]),
                "patches": int(pixels.shape[0]),
                "remat": args.remat,
                "jax_backend": jax.default_backend(),
                "torch_threads": torch.get_num_threads(),
                "ours_s": round(ours_s, 3),
                "torch_s": round(torch_s, 3),
                "torch_over_ours": round(torch_s / ours_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
