"""Colour accuracy of a trained stable-diffusion run on the coloured-shapes task.

    python -m launch.eval_sd --run_dir=runs/sd_quickstart [--samples_per_color=8 --guidance_scale=3]

Samples ``"a <colour> <shape> ."`` for every colour of the shapes dataset with the trained model and with the
run's model before training, and classifies each image's colour (:func:`vla_foundry_jax.apps.sd_eval.evaluate_run`).
The LAST line printed is a JSON object with ``color_accuracy``, ``untrained_color_accuracy``, ``num_samples``
(and per-colour figures).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from vla_foundry_jax import cli
from vla_foundry_jax.apps.sd_eval import evaluate_run

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a stable_diffusion run.", required=True)
flags.DEFINE_integer("samples_per_color", 8, "Images sampled per colour.")
flags.DEFINE_float("guidance_scale", None, "Guidance scale (default: the model's when trained with guidance).")
flags.DEFINE_integer("num_steps", 50, "Sampling steps.")
flags.DEFINE_integer("seed", 0, "Sampling seed (the same for the trained and the untrained model).")
flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run has them.")
flags.DEFINE_string("grid_out", None, "Also write the trained model's samples as a PNG grid (one row per colour).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    result = evaluate_run(
        FLAGS.run_dir,
        samples_per_color=FLAGS.samples_per_color,
        guidance_scale=FLAGS.guidance_scale,
        num_steps=FLAGS.num_steps,
        seed=FLAGS.seed,
        use_ema=FLAGS.use_ema,
        grid_out=FLAGS.grid_out,
    )
    for colour, acc in result["per_color"].items():
        print(f"{colour:>8}: {acc:.3f} (untrained {result['untrained_per_color'][colour]:.3f})")
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
