"""Generate text from a trained run: ``python -m launch.generate --run_dir=DIR --prompt='the red'``.

The model is rebuilt from the params stored in the checkpoint; no gin file is needed
(:func:`vla_foundry_jax.apps.text_generation.sample_text`).
"""

from __future__ import annotations

from absl import flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.text_generation import sample_text

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step> directory) of a trained LLM.", required=True)
flags.DEFINE_string("prompt", "", "Prompt text.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 50, "Keep the k most likely tokens (0: off).")
flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    text = sample_text(
        FLAGS.run_dir,
        FLAGS.prompt,
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        seed=FLAGS.seed,
    )
    print(text)


if __name__ == "__main__":
    cli.run(main)
