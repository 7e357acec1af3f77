"""Export a ``transformer_hf`` run to a Hugging Face checkpoint directory.

    python -m launch.export_hf --run_dir=RUN_DIR --out_dir=HF_DIR [--dtype=float32|float16|bfloat16]

Writes ``HF_DIR/model.safetensors`` + ``config.json`` (+ tokenizer / generation files next to the run's HF config),
loadable with ``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)``. See
:func:`vla_foundry_jax.apps.hf_conversion.export_transformer_hf`.
"""

from __future__ import annotations

from absl import flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.hf_conversion import export_transformer_hf

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a transformer_hf run.", required=True)
flags.DEFINE_string("out_dir", None, "HF checkpoint directory to write.", required=True)
flags.DEFINE_string("dtype", None, "Tensor dtype to write: float32, float16 or bfloat16 (default: as trained).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    print(export_transformer_hf(FLAGS.run_dir, FLAGS.out_dir, dtype=FLAGS.dtype))


if __name__ == "__main__":
    cli.run(main)
