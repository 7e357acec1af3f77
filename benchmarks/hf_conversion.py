"""Conversion of a ~100M-parameter Llama safetensors checkpoint into our run layout: time and peak host memory.

    python benchmarks/hf_conversion.py [--hidden 768 --layers 12 --vocab 32000]

A random Llama (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000, tied: ~110M parameters, float32) is
made from its config and saved with ``save_pretrained`` (torch, benchmark only). ``apps.hf_conversion.convert_hf`` then
runs in a fresh subprocess that, after its imports, records its resident memory (baseline), resets the peak
(``/proc/self/clear_refs``) and reports the peak (``VmHWM``) at the end, and separately the peak when the load phase
(safetensors -> placed parameters) returns, before the Orbax save. Prints one JSON line: seconds, model bytes, peak
RSS, ``peak_over_baseline / model_bytes`` (target <= 1.3: the converted parameters themselves are 1.0) and the same
for the load phase alone (``load_*``). Seen on the 2-core CPU: 1.14x with the save (load 1.03x); 2.06x while the
``model`` item was written zstd-compressed (Orbax held the compressed copies of every array until the commit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

import jax, numpy, orbax.checkpoint, transformers, safetensors  # noqa: imports count towards the baseline
from flax import nnx
from vla_foundry_jax.apps import hf_conversion
from transformers import AutoConfig
AutoConfig.from_pretrained(sys.argv[1])
baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
load = {}
_load = hf_conversion.load_hf_decoder_weights
def _timed_load(*a, **k):  # convert_hf calls it by its module name: marks the end of the load phase
    out = _load(*a, **k)
    load.update(seconds=time.perf_counter() - t0, peak=status("VmHWM"))
    return out
hf_conversion.load_hf_decoder_weights = _timed_load
t0 = time.perf_counter()
summary = hf_conversion.convert_hf(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "baseline_rss": baseline, "peak_rss": status("VmHWM"), "peak_reset": reset,
                  "load_seconds": load["seconds"], "load_peak_rss": load["peak"], "params": summary["params"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()

    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        tie_word_embeddings=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, run_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "run")
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(hf_dir)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, hf_dir, run_dir, ROOT], cwd=ROOT, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        ckpt_bytes = sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(os.path.join(run_dir, "checkpoints"))
            for f in fs
        )
    over = child["peak_rss"] - child["baseline_rss"]
    load_over = child["load_peak_rss"] - child["baseline_rss"]
    print(
        json.dumps(
            {
                "benchmark": "hf_conversion_llama",
                "params": child["params"],
                "model_bytes": model_bytes,
                "convert_s": round(child["seconds"], 2),
                "subprocess_wall_s": round(wall, 2),
                "baseline_rss_mb": round(child["baseline_rss"] / 2**20, 1),
                "peak_rss_mb": round(child["peak_rss"] / 2**20, 1),
                "peak_over_baseline_mb": round(over / 2**20, 1),
                "peak_over_baseline_vs_model_bytes": round(over / model_bytes, 3),
                "peak_reset_after_imports": child["peak_reset"],
                # the load phase alone (safetensors -> placed parameters, before the Orbax save)
                "load_s": round(child["load_seconds"], 2),
                "load_peak_over_baseline_mb": round(load_over / 2**20, 1),
                "load_peak_over_baseline_vs_model_bytes": round(load_over / model_bytes, 3),
                "checkpoint_bytes": ckpt_bytes,
                "target": 1.3,
            }
        )
    )


if __name__ == "__main__":
    main()
