"""Convert a Hugging Face causal LM into one of our runs (Orbax checkpoint at step 0).

    python -m launch.convert_hf --hf_pretrained=DIR_OR_HUB_ID --output_dir=RUN_DIR [--type=transformer_hf]

Writes the run layout with the HF config and tokenizer beside it; the run needs neither the HF directory nor the
hub afterwards. See :func:`vla_foundry_jax.apps.hf_conversion.convert_hf` (its module docstring says how to
sample from and train on the converted run). The last line printed is a JSON summary.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from vla_foundry_jax import cli
from vla_foundry_jax.apps.hf_conversion import convert_hf

flags.DEFINE_string("hf_pretrained", None, "HF model directory (config.json + *.safetensors) or hub id.")
flags.DEFINE_string("output_dir", None, "Run directory to create (must not hold a checkpoint yet).")
flags.DEFINE_string("type", "transformer_hf", "Model type to convert into (only transformer_hf).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.hf_pretrained or not FLAGS.output_dir:
        raise app.UsageError("--hf_pretrained and --output_dir are required.")
    summary = convert_hf(FLAGS.hf_pretrained, FLAGS.output_dir, model_type=FLAGS.type)
    logging.info("converted %s -> %s", FLAGS.hf_pretrained, summary["output_dir"])
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
