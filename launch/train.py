"""Train any model type from gin files: ``python -m launch.train --gin_file=gin_configs/quickstart.gin``.

Every process of a multi-host run executes the same command; JAX's runtime joins them.
"""

from __future__ import annotations

import logging as logging_std
import os

from absl import app, flags, logging

flags.DEFINE_multi_string("gin_file", [], "Gin file(s) to parse, in order (a name under gin_configs/ also works).")
flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin binding(s) applied after the files, e.g. 'transformer.n_layers = 4'."
)
flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories searched for gin files and includes.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 (else auto-detected).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
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
    from vla_foundry_jax import gin_utils

    bindings = list(FLAGS.gin_bindings)
    for name in ("coordinator_address", "num_processes", "process_id"):
        value = getattr(FLAGS, name)
        if value is not None:
            bindings.append(f"distributed.{name} = {value!r}")
    gin_utils.parse_gin(FLAGS.gin_file, bindings, FLAGS.gin_search_paths)
    experiment = gin_utils.build_experiment()

    from vla_foundry_jax.training.loop import train

    result = train(experiment, gin_config=gin_utils.operative_config_str())
    exp = result.experiment
    logging.info("finished: %s", {k: round(v, 5) for k, v in result.metrics.items() if isinstance(v, float)})
    if exp.sample_prompt is not None:
        from vla_foundry_jax.sampling import sample_text

        text = sample_text(result, exp.sample_prompt, max_new_tokens=exp.sample_max_new_tokens)
        print(f"sample: {exp.sample_prompt!r} -> {text!r}", flush=True)
        if exp.output_dir:
            with open(os.path.join(exp.output_dir, "sample.txt"), "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
