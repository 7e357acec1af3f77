"""Self-contained runs: what inference needs from the data, copied into ``<run>/data/`` when training starts.

A run's params name the dataset's files (stats.json, the processor directory, the source VLM run of a
``vlm_foundry_backbone``) by the paths training was given. Those paths break once the run is copied to another
directory, machine or object store, or the dataset is deleted. :func:`write_run_data` copies, beside the
checkpoints::

    <run>/data/stats.json                  the merged normalisation statistics of robotics.dataset_statistics
    <run>/data/preprocessing_config.yaml   the first dataset's preprocessing config (cameras, image indices,
                                           windows, resize size and method, relative-action specs)
    <run>/data/processor/                  the processor (image processor config + tokenizer, save_pretrained)
    <run>/data/tokenizer/                  the data's own tokenizer (simple_vlm, text data), save_pretrained
    <run>/data/source_vlm/<path>/params.json   each vlm_foundry_backbone's source VLM experiment (architecture)

:func:`localize_experiment` points a loaded experiment at those copies (when the run has them), so
``sampling.load_run_model`` and every CLI built on it read nothing outside the run. The directory is built under a
temporary name and renamed, so a run never holds half of it; an existing ``data/`` is kept (a resumed run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import yaml
from absl import logging

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import paths
from vla_foundry_jax.data.normalization import load_stats, merge_stats
from vla_foundry_jax.data.robotics import PREPROCESSING_CONFIG, read_preprocessing_config
from vla_foundry_jax.params import ModelParams, TrainExperimentParams
from vla_foundry_jax.params.model_params import submodel_params

RUN_DATA = "data"
STATS = "stats.json"
PROCESSOR = "processor"
TOKENIZER = "tokenizer"
SOURCE_VLM = "source_vlm"
_NOT_DIRECTORIES = ("simple_vlm", "stable_diffusion")


def run_dir_of(path: str) -> str:
    """The run directory of ``path`` (a run, its ``checkpoints/`` or a ``checkpoints/<step>`` directory)."""
    return paths.dirname(paths.dirname(ckpt_lib.resolve_step_dir(path)))


def _map_models(params: ModelParams, fn: Any, prefix: str = "") -> ModelParams:
    """``params`` with ``fn(path, child)`` applied to every (sub-)model, children first."""
    changes = {name: _map_models(child, fn, f"{prefix}{name}.") for name, child in submodel_params(params).items()}
    return fn(prefix, params.replace(**changes) if changes else params)


def _save_pretrained(kind: str, name: str, target: str) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer

    if kind == PROCESSOR:
        AutoImageProcessor.from_pretrained(name).save_pretrained(target)
    AutoTokenizer.from_pretrained(name).save_pretrained(target)


def _source_vlm_experiments(exp: TrainExperimentParams) -> dict[str, TrainExperimentParams]:
    from vla_foundry_jax.models.build import submodels
    from vla_foundry_jax.models.vlm_backbones import source_vlm_experiment

    return {p: source_vlm_experiment(c) for p, c in submodels(exp.model) if c.type == "vlm_foundry_backbone"}


def collect_run_data(exp: TrainExperimentParams, target: str) -> None:
    """Write the ``data/`` files of the module docstring for the resolved experiment ``exp`` into ``target``."""
    data = exp.data
    os.makedirs(target, exist_ok=True)
    stats_paths = list(getattr(data, "dataset_statistics", None) or [])
    if stats_paths:
        stats = merge_stats([load_stats(p) for p in stats_paths])
        with open(os.path.join(target, STATS), "w", encoding="utf-8") as f:
            json.dump(stats, f, separators=(",", ":"))
        for directory in [paths.dirname(p) for p in [*stats_paths, *data.dataset_manifest]]:
            cfg = None if paths.is_remote(directory) else read_preprocessing_config(directory)
            if cfg is not None:
                with open(os.path.join(target, PREPROCESSING_CONFIG), "w", encoding="utf-8") as f:
                    yaml.safe_dump(cfg, f, sort_keys=True)
                break
    processor = getattr(data, "processor", None)
    tokenizer = getattr(data, "tokenizer", None)
    copies = []
    if processor and processor not in _NOT_DIRECTORIES:
        copies.append((PROCESSOR, processor))
        if tokenizer:  # the processor's own tokenizer is replaced by the named one
            copies.append((TOKENIZER, tokenizer))
    elif tokenizer or processor == "simple_vlm":
        from vla_foundry_jax.data.processor import SIMPLE_VLM_DEFAULT_TOKENIZER

        copies.append((TOKENIZER, tokenizer or SIMPLE_VLM_DEFAULT_TOKENIZER))
    for kind, name in copies:
        try:
            _save_pretrained(kind, name, os.path.join(target, kind))
        except (OSError, ValueError) as e:  # training already read it, so this is rare (e.g. a custom class)
            shutil.rmtree(os.path.join(target, kind), ignore_errors=True)
            logging.warning("the run keeps no copy of %s %r (%s); loading it will read %r again", kind, name, e, name)
    for path, source in _source_vlm_experiments(exp).items():
        directory = os.path.join(target, SOURCE_VLM, path[:-1] or "model")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "params.json"), "w", encoding="utf-8") as f:
            f.write(source.to_json())


def write_run_data(output_dir: str, exp: TrainExperimentParams) -> None:
    """Copy what inference needs into ``<output_dir>/data`` (atomic; kept when it already exists)."""
    final = paths.join(output_dir, RUN_DATA)
    if paths.exists(final):
        return
    with tempfile.TemporaryDirectory(prefix="run_data_") as tmp:
        staged = os.path.join(tmp, RUN_DATA)
        collect_run_data(exp, staged)
        if paths.is_remote(output_dir):
            for root, _, files in os.walk(staged):
                for name in sorted(files):
                    local = os.path.join(root, name)
                    rel = os.path.relpath(local, staged).replace(os.sep, "/")
                    with open(local, "rb") as f:
                        paths.write_bytes(paths.join(final, rel), f.read())
            return
        os.makedirs(output_dir, exist_ok=True)
        partial = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staged, partial)
        os.replace(partial, final)


def run_data_dir(run_dir: str) -> str | None:
    """A local directory holding ``<run_dir>/data`` (a copy for a remote run), or None when the run has none."""
    path = paths.join(run_dir, RUN_DATA)
    if not paths.exists(path):
        return None
    return paths.local_dir(path) if paths.is_remote(run_dir) else path


def localize_experiment(exp: TrainExperimentParams, run_dir: str) -> TrainExperimentParams:
    """``exp`` reading its data files from ``<run_dir>/data`` where the run has copies (module docstring)."""
    local = run_data_dir(run_dir)
    if local is None:
        return exp
    data = exp.data
    changes: dict[str, Any] = {}
    if os.path.isfile(os.path.join(local, STATS)) and getattr(data, "dataset_statistics", None):
        changes["dataset_statistics"] = [os.path.join(local, STATS)]
    if os.path.isdir(os.path.join(local, PROCESSOR)):
        changes["processor"] = os.path.join(local, PROCESSOR)
    if os.path.isdir(os.path.join(local, TOKENIZER)) and hasattr(data, "tokenizer"):
        changes["tokenizer"] = os.path.join(local, TOKENIZER)
    if changes:
        exp = exp.replace(data=data.replace(**changes))

    def point_at_copy(path: str, child: ModelParams) -> ModelParams:
        directory = os.path.join(local, SOURCE_VLM, path[:-1] or "model")
        if child.type != "vlm_foundry_backbone" or not os.path.isfile(os.path.join(directory, "params.json")):
            return child
        return child.replace(vlm_experiment_dir=directory, resume_from_checkpoint=None)

    return exp.replace(model=_map_models(exp.model, point_at_copy))


def run_preprocessing_config(run_dir: str) -> dict[str, Any] | None:
    """The run's copy of the dataset's preprocessing config, or None (a run trained before runs held one)."""
    local = run_data_dir(run_dir)
    return None if local is None else read_preprocessing_config(local)
