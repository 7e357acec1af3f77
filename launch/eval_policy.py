"""Roll a trained reach policy out in ``ReachEnv``: ``python -m launch.eval_policy --run_dir=DIR [--num_episodes=50]``.

Receding-horizon rollouts of the policy (EMA weights when the run kept them) beside a random policy on the same
episode seeds, and a PNG of predicted vs expert actions on validation samples
(:func:`vla_foundry_jax.apps.policy_eval.evaluate`, whose docstring describes them).

The last line printed is a JSON object with ``success_rate``, ``random_success_rate``, ``num_episodes``.
"""

from __future__ import annotations

import json

from absl import app, flags

from vla_foundry_jax import cli
from vla_foundry_jax.apps.policy_eval import evaluate

flags.DEFINE_string("run_dir", None, "Run directory (or checkpoints/<step>) of a reach policy.", required=True)
flags.DEFINE_integer("num_episodes", 50, "Episodes rolled out (env seeds seed .. seed + n - 1).")
flags.DEFINE_integer("num_inference_steps", 10, "Denoising steps per plan (None/0: the scheduler's T).")
flags.DEFINE_integer("execute_steps", 4, "Predicted future commands executed before replanning.")
flags.DEFINE_integer("max_steps", 24, "Episode step limit.")
flags.DEFINE_integer("seed", 0, "First env seed; also seeds sampling noise.")
flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
flags.DEFINE_string("plot", None, "PNG of predicted vs expert actions (default <run_dir>/eval_policy.png).")
flags.DEFINE_integer("num_plot_samples", 4, "Validation samples drawn in the PNG.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = evaluate(
        FLAGS.run_dir,
        num_episodes=FLAGS.num_episodes,
        num_inference_steps=FLAGS.num_inference_steps or None,
        execute_steps=FLAGS.execute_steps,
        max_steps=FLAGS.max_steps,
        seed=FLAGS.seed,
        use_ema=FLAGS.use_ema,
        plot=FLAGS.plot,
        num_plot_samples=FLAGS.num_plot_samples,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    cli.run(main)
