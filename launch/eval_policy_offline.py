"""Action error of a trained policy on held-out robotics data: ``python -m launch.eval_policy_offline --run_dir=DIR``.

Works for any robotics dataset (e.g. one made by ``launch.convert_lerobot``): samples action windows for the run's
validation samples (or ``--manifests``) and compares them with the recorded actions in raw units
(``vla_foundry_jax/apps/policy_offline_eval.py``). The last line printed is a JSON object with
``val_action_error``, ``val_action_error_first``, ``val_action_mae``, ``num_samples``. Bad input prints one line
``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import json

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.policy_offline_eval import offline_action_error

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a diffusion_policy.", required=True)
flags.DEFINE_list("manifests", None, "Held-out manifests (default: the run's robotics.val_dataset_manifest).")
flags.DEFINE_integer("batch_size", 32, "Samples per batch.")
flags.DEFINE_integer("max_batches", None, "Evaluate at most this many batches (default: all).")
flags.DEFINE_integer("num_inference_steps", 10, "Denoising steps per prediction.")
flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = FLAGS
    result = offline_action_error(
        f.run_dir, manifests=f.manifests, batch_size=f.batch_size, max_batches=f.max_batches,
        num_inference_steps=f.num_inference_steps, use_ema=f.use_ema, seed=f.seed,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
