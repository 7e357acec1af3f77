"""Train any model type from gin files: ``python -m launch.train --gin_file=gin_configs/quickstart.gin``.

Every process of a multi-host run executes the same command; JAX's runtime joins them
(:func:`vla_foundry_jax.apps.gin_train.train_from_gin`).
"""

from __future__ import annotations

import logging as logging_std

from absl import app, flags, logging

from vla_foundry_jax import cli
from vla_foundry_jax.apps.gin_train import train_from_gin

flags.DEFINE_multi_string("gin_file", [], "Gin file(s) to parse, in order (a name under gin_configs/ also works).")
flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin binding(s) applied after the files, e.g. 'transformer.n_layers = 4'."
)
flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories searched for gin files and includes.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 (else auto-detected).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue the run in experiment.output_dir under a changed experiment (lr, budget, ...); without it a rerun "
    "with changes is refused and lists them.",
)
FLAGS = flags.FLAGS


class _QuietLibraries(logging_std.Filter):
    """Drop the INFO chatter of Orbax and friends from the run log (warnings still pass)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "etils"))
        return record.levelno >= logging_std.WARNING or not noisy


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    done = train_from_gin(
        FLAGS.gin_file,
        FLAGS.gin_bindings,
        FLAGS.gin_search_paths,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        allow_config_change=FLAGS.allow_config_change,
    )
    logging.info("finished: %s", {k: round(v, 5) for k, v in done.result.metrics.items() if isinstance(v, float)})
    if done.sample is not None:
        print(f"sample: {done.result.experiment.sample_prompt!r} -> {done.sample!r}", flush=True)


if __name__ == "__main__":
    cli.run(main)
