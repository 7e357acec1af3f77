"""Plot training curves of one or more runs: ``python -m launch.plot_runs RUN [RUN ...] --out=curves.png``.

Loss, validation loss, learning rate, gradient norm and throughput against the step (``--x=samples``: samples
seen), one line per run named in the legend; runs may be local directories or ``s3://`` / ``gs://`` URLs
(:func:`vla_foundry_jax.training.curves.plot_runs`).
"""

from __future__ import annotations

from absl import flags

from vla_foundry_jax import cli
from vla_foundry_jax.training.curves import DEFAULT_METRICS, X_AXES, plot_runs

flags.DEFINE_string("out", "curves.png", "PNG to write (a local path or an fsspec URL).")
flags.DEFINE_list(
    "metrics", [], f"metrics.jsonl keys to draw, comma-separated (default: those of {list(DEFAULT_METRICS)} logged)."
)
flags.DEFINE_enum("x", "step", list(X_AXES), "x-axis: the step, or the samples seen (step x global batch size).")
flags.DEFINE_list("labels", [], "Legend names, one per run (default: each run's directory name).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    runs = argv[1:]
    if not runs:
        cli.fail("give one or more run directories: python -m launch.plot_runs RUN [RUN ...] --out=curves.png")
    if FLAGS.labels and len(FLAGS.labels) != len(runs):
        cli.fail(f"--labels has {len(FLAGS.labels)} names for {len(runs)} runs; give one per run or none.")
    out = plot_runs(runs, FLAGS.out, metrics=FLAGS.metrics or None, x=FLAGS.x, labels=FLAGS.labels or None)
    print(out)


if __name__ == "__main__":
    cli.run(main)
