"""Export one of our runs to the original's (PyTorch VLA Foundry) experiment layout.

    python -m launch.export_foundry --run_dir=RUN --out_dir=DIR

DIR gets config.yaml, config_model.yaml, the data-side files and checkpoints/checkpoint_<N>.pt with the original's
state-dict names (``BaseModel.from_pretrained(DIR)`` of the original loads it); see
:mod:`vla_foundry_jax.apps.foundry_import`. The last line printed is a JSON summary.
"""

from __future__ import annotations

import json

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.foundry_import import export_foundry

flags.DEFINE_string("run_dir", None, "Our run directory (or its checkpoints/<step>).")
flags.DEFINE_string("out_dir", None, "Directory to create (absent or empty).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.run_dir or not FLAGS.out_dir:
        raise app.UsageError("--run_dir and --out_dir are required.")
    print(json.dumps(export_foundry(FLAGS.run_dir, FLAGS.out_dir)))


if __name__ == "__main__":
    cli.run(main)
