"""Convert a VLA Foundry (PyTorch) YAML config or preset to gin, printed on stdout.

    python -m launch.foundry_config --config_path=X.yaml [--override model.hidden_dim=512 ...] > X.gin

``X.yaml`` is an experiment's ``config.yaml`` or a file of the original's ``config_presets/`` (``!include`` and
``<<:`` merges resolved relative to it). Overrides are the original's command-line ones written ``key.path=value``.
Fields with no meaning here are listed on stderr; the gin feeds ``python -m launch.train --gin_file=X.gin``. See
:mod:`vla_foundry_jax.configs.foundry_yaml`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.configs.foundry_yaml import foundry_yaml_to_gin

flags.DEFINE_string("config_path", None, "VLA Foundry YAML: an experiment's config.yaml or a preset.", required=True)
flags.DEFINE_multi_string(
    "override", [], "Override applied after the file, as key.path=value (e.g. hparams.lr=3e-4); repeatable."
)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass overrides as --override key.path=value")
    sys.stdout.write(foundry_yaml_to_gin(FLAGS.config_path, FLAGS.override))


if __name__ == "__main__":
    cli.run(main)
