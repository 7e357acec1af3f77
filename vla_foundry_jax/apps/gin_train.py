"""A training run from gin files (``launch.train``): parse, build the experiment, train, sample its prompt."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from absl import logging

from vla_foundry_jax import gin_utils, paths
from vla_foundry_jax.apps.text_generation import sample_text
from vla_foundry_jax.training.loop import TrainResult, train


@dataclasses.dataclass
class GinTrainResult:
    """The finished run and, when the experiment names a ``sample_prompt``, the model's continuation of it."""

    result: TrainResult
    sample: str | None


def train_from_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    gin_search_paths: Sequence[str] = (),
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    allow_config_change: bool = False,
) -> GinTrainResult:
    """Parse ``gin_files`` then ``gin_bindings`` (a name under gin_configs/ also works), build the experiment and
    run (or resume) it; the operative gin config is written to ``<output_dir>/config.gin``.

    ``coordinator_address`` / ``num_processes`` / ``process_id`` bind ``distributed.*`` of a multi-process run
    (None: auto-detected). Every process of a multi-host run makes the same call. With
    ``experiment.sample_prompt`` set, the trained model continues it (``sample_max_new_tokens`` tokens), and the
    text is also written to ``<output_dir>/sample.txt``. ``allow_config_change``: continue a run of the same
    ``output_dir`` under a changed experiment (``training.loop.check_rerun``).
    """
    bindings = list(gin_bindings)
    for name, value in (
        ("coordinator_address", coordinator_address),
        ("num_processes", num_processes),
        ("process_id", process_id),
    ):
        if value is not None:
            bindings.append(f"distributed.{name} = {value!r}")
    gin_utils.parse_gin(gin_files, bindings, gin_search_paths)
    experiment = gin_utils.build_experiment()
    logging.set_verbosity(experiment.log_level.lower())
    result = train(experiment, gin_config=gin_utils.operative_config_str(), allow_config_change=allow_config_change)
    exp = result.experiment
    text = None
    if exp.sample_prompt is not None:
        text = sample_text(result, exp.sample_prompt, max_new_tokens=exp.sample_max_new_tokens)
        if exp.output_dir:
            paths.write_text(paths.join(exp.output_dir, "sample.txt"), text + "\n")
    return GinTrainResult(result, text)
