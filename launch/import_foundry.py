"""Import an experiment of the original (PyTorch VLA Foundry) as one of our runs.

    python -m launch.import_foundry --source=SRC --output_dir=RUN [--checkpoint=checkpoint_N.pt] [--ema]

SRC: the original's experiment directory (local, s3://, gs://), hf://org/repo or a bare hub repo id. The run holds
the weights (Orbax, step 0), params.json, the data-side files and the original's YAML files; see
:mod:`vla_foundry_jax.apps.foundry_import`. The last line printed is a JSON summary.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from vla_foundry_jax import cli
from vla_foundry_jax.apps.foundry_import import import_foundry

flags.DEFINE_string("source", None, "The original's experiment directory, hf://org/repo or a hub repo id.")
flags.DEFINE_string("output_dir", None, "Run directory to create (absent or empty).")
flags.DEFINE_string("checkpoint", None, "checkpoint_<N>.pt to import (default: the latest, natural sort).")
flags.DEFINE_bool("ema", False, "Import the EMA weights (checkpoints/ema_<N>.pt) instead of the trained ones.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.source or not FLAGS.output_dir:
        raise app.UsageError("--source and --output_dir are required.")
    summary = import_foundry(FLAGS.source, FLAGS.output_dir, checkpoint=FLAGS.checkpoint, ema=FLAGS.ema)
    logging.info("imported %s -> %s", FLAGS.source, summary["output_dir"])
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
