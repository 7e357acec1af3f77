"""Train-step speed: our ``transformer_hf`` Llama vs Hugging Face PyTorch ``LlamaForCausalLM``, same config and batch.

    python benchmarks/hf_llama.py [--batch 8 --seq_len 256 --steps 5]

Both float32 on the CPU, in one process: an ~11M-parameter Llama (hidden 96, 8 layers, 4 heads, intermediate 256,
vocab 50432, untied head; the original's 11M model size). The torch step is forward + cross-entropy + backward +
``torch.optim.AdamW.step`` + ``zero_grad``; ours is the jitted train step (AdamW included). Prints one JSON line:
median step time, tokens/s for each and ``ours_vs_torch`` (> 1: ours faster). Reference: HF torch ran an 11M Llama
at 1769 tokens/s on this machine class. torch is used here only (benchmark), never by the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_step, time_step

CONFIG = {
    "vocab_size": 50432,
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def torch_step_times(config_dir: str, ids: np.ndarray, steps: int) -> tuple[list[float], int]:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(config_dir, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x = torch.from_numpy(ids[:, :-1]).long()
    y = torch.from_numpy(ids[:, 1:]).long()

    def step():
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    import torch
    import transformers

    from vla_foundry_jax.params import TransformerHFParams

    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (args.batch, args.seq_len + 1))
    tokens = args.batch * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(tmp)
        state, step = build_step(TransformerHFParams(hf_pretrained=tmp), batch=args.batch)
        batch = {"input_ids": jnp.asarray(ids, jnp.int32), "loss_mask": jnp.ones(ids.shape, bool)}
        ours = time_step(state, step, [batch], args.steps)
        del state, step
        torch_times, torch_params = torch_step_times(tmp, ids, args.steps)
    torch_med = float(np.median(torch_times))
    ours_tps = tokens / ours["step_s_median"]
    torch_tps = tokens / torch_med
    print(
        json.dumps(
            {
                "benchmark": "hf_llama_train_step",
                "params": ours["params"],
                "torch_params": torch_params,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "ours_compile_s": ours["compile_s"],
                "ours_step_s_median": ours["step_s_median"],
                "ours_tokens_per_s": round(ours_tps, 1),
                "torch_step_s_median": round(torch_med, 4),
                "torch_tokens_per_s": round(torch_tps, 1),
                "ours_vs_torch": round(ours_tps / torch_tps, 2),
                "torch_threads": torch.get_num_threads(),
                "reference_torch_tokens_per_s": 1769.0,
            }
        )
    )


if __name__ == "__main__":
    main()
