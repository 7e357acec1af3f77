"""The original (PyTorch VLA Foundry) experiments <-> our runs (``launch.import_foundry``, ``launch.export_foundry``).

The original's experiment directory (local, ``s3://``, ``gs://``, ``hf://org/repo`` or a bare hub repo id, as its
``BaseModel.from_pretrained`` takes) holds ``config.yaml`` (the whole config; its ``model`` section names the
architecture), ``config_model.yaml`` and friends, the data-side files ``stats.json``, ``preprocessing_config.yaml``,
``processing_metadata.json``, and ``checkpoints/checkpoint_<N>.pt`` (a torch pickle of ``{"state_dict",
"checkpoint_num", "global_step", "samples_seen", ...}``) plus ``checkpoints/ema_<N>.pt`` (``"ema_state_dict"``)
when EMA was on; the latest checkpoint is the last in natural sort order. A published VLA whose backbone is a
``vlm_foundry_backbone`` carries its VLM's architecture as ``vlm_config_model.yaml``.

Import (:func:`import_foundry`) writes one of our runs: ``checkpoints/0`` (Orbax: the weights, float32, and the
experiment params), ``params.json``, the data-side files copied in, the original's YAML files under
``foundry_config/`` and ``foundry_import.json`` (source, checkpoint file, ``checkpoint_num``, ``global_step``,
``samples_seen``, EMA or not). The ``.pt`` is read by :mod:`~vla_foundry_jax.convert.torch_pickle` (nothing in it
runs) and mapped strictly by :mod:`~vla_foundry_jax.convert.foundry_maps`. The run is assembled beside
``output_dir`` and renamed into place when complete. ``resume_from_checkpoint`` / ``pretrained`` paths of the
original's config are cleared (they name the original's files; the weights come from the import). A
``vlm_foundry_backbone``'s VLM architecture is stored as ``backbone_vlm/params.json`` in the run, which its
``vlm_experiment_dir`` names.

Export (:func:`export_foundry`) is the inverse: ``config.yaml`` (the imported one with the model section
rewritten, or a ``model``-only file for a run trained here), ``config_model.yaml`` and
``checkpoints/checkpoint_<N>.pt`` with the original's names and constant buffers, ``torch.load(...,
weights_only=True)``-readable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import shutil
import time
from collections import OrderedDict
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import paths
from vla_foundry_jax.configs.foundry_yaml import (
    FoundryConfig,
    foundry_config_to_gin,
    load_foundry_config,
    params_to_foundry_yaml,
)
from vla_foundry_jax.convert.engine import load_rules
from vla_foundry_jax.convert.foundry_maps import PlanSource, check_supported, export_state_dict, foundry_rules
from vla_foundry_jax.convert.torch_pickle import StateDictSource, TensorRef, load_pt, save_pt
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.models import build_model
from vla_foundry_jax.params import HyperParams, ModelParams, TrainExperimentParams
from vla_foundry_jax.params.base import BaseParams
from vla_foundry_jax.sampling import load_model

DATA_FILES = ("stats.json", "preprocessing_config.yaml", "processing_metadata.json")
CONFIG_FILES = (
    "config.yaml",
    "config_model.yaml",
    "config_processor.yaml",
    "config_normalizer.yaml",
    "vlm_config_model.yaml",
)
FOUNDRY_DIR = "foundry_config"
METADATA = "foundry_import.json"
BACKBONE_VLM = "backbone_vlm"
BUFFERS = "buffers.npz"  # under FOUNDRY_DIR: the checkpoint's tensors the model does not use, for an exact export
_CKPT = re.compile(r"checkpoint_(\d+)\.pt")


class FoundryImportError(VLAFoundryError, ValueError):
    """An experiment of the original that cannot be imported (or a run that cannot be exported), and why."""


def natural_key(name: str) -> list[Any]:
    """Natural sort key (``checkpoint_10`` after ``checkpoint_9``), as the original sorts its checkpoints."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def resolve_source(source: str) -> str:
    """``source`` as a path of :mod:`vla_foundry_jax.paths`: a bare ``org/repo`` that is no local path is a hub id."""
    if not source:
        raise FoundryImportError("--source is empty; give an experiment directory, hf://org/repo or a hub repo id.")
    if paths.is_remote(source):
        return source.rstrip("/")
    local = os.path.abspath(os.path.expanduser(source))
    if os.path.exists(local):
        return local
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return f"hf://{source}"
    raise FoundryImportError(f"--source={source!r} does not exist; give the original's experiment directory.")


def _listdir(path: str, what: str, source: str) -> list[str]:
    try:
        return [paths.basename(n.rstrip("/")) for n in paths.listdir(path)]
    except paths.PathError as e:
        hub = ""
        if paths.scheme(source) == "hf":
            repo = source[len("hf://") :]
            hub = (
                f" Offline? Download it where the hub is reachable (`huggingface-cli download {repo} --local-dir "
                f"DIR`) and pass --source=DIR."
            )
        raise FoundryImportError(f"--source={source!r}: cannot list {what} ({e}).{hub}") from e


def choose_checkpoint(source: str, checkpoint: str | None) -> tuple[str, int]:
    """(file name, number) of ``checkpoints/checkpoint_<N>.pt`` to import: ``checkpoint`` or the latest."""
    ckpt_dir = paths.join(source, "checkpoints")
    names = _listdir(source, "the experiment directory", source)
    if "checkpoints" not in names:
        raise FoundryImportError(
            f"--source={source!r} has no checkpoints/ directory (the original saves checkpoints/checkpoint_<N>.pt); "
            f"give the experiment directory of a run that saved a checkpoint."
        )
    found = sorted((n for n in _listdir(ckpt_dir, "checkpoints/", source) if _CKPT.fullmatch(n)), key=natural_key)
    if not found:
        raise FoundryImportError(f"{ckpt_dir} holds no checkpoint_<N>.pt; give a run that saved a checkpoint.")
    if checkpoint is None:
        name = found[-1]
    else:
        name = os.path.basename(checkpoint)
        if name not in found:
            raise FoundryImportError(f"--checkpoint={checkpoint!r} is not in {ckpt_dir}; it holds {found}.")
    return name, int(_CKPT.fullmatch(name).group(1))


def _read_yaml(path: str, what: str) -> Any:
    try:
        return yaml.safe_load(paths.read_text(path))
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise FoundryImportError(f"{path}: not valid YAML ({first}); is it the original's {what}?") from e


def load_config(path: str, section: str, what: str) -> FoundryConfig:
    """The original's YAML at ``path`` mapped onto our params (:mod:`~vla_foundry_jax.configs.foundry_yaml`:
    every field by name, meaningless ones listed in the log, unknown ones an error); it must describe ``section``."""
    cfg = load_foundry_config(path)
    if cfg.section != section:
        raise FoundryImportError(f"{path} describes a {cfg.section} preset, not the original's {what}.")
    if section == "experiment" and cfg.experiment.model is None:
        raise FoundryImportError(f"{path} has no model section; is it the config.yaml of a training run?")
    return cfg


def _localized(data: Any, run_dir: str, copied: set[str]) -> Any:
    """``data`` params with every path whose file name is a data-side file copied into the run pointing at the
    copy (as the original's ``localize_params`` prefers the files next to ``config.yaml``)."""
    if data is None:
        return None

    def fix(value: Any) -> Any:
        if isinstance(value, str) and posixpath.basename(value.rstrip("/")) in copied:
            return os.path.join(run_dir, posixpath.basename(value.rstrip("/")))
        if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
            return type(value)(fix(v) for v in value)
        return value

    changes = {}
    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        new = _localized(value, run_dir, copied) if isinstance(value, BaseParams) else fix(value)
        if new is not value:
            changes[f.name] = new
    return data.replace(**changes) if changes else data


def _cleared(params: ModelParams, vlm_dir: str | None) -> ModelParams:
    """``params`` without the original's weight paths; a ``vlm_foundry_backbone`` pointed at ``vlm_dir``."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, ModelParams):
            changes[f.name] = _cleared(value, vlm_dir)
    if params.resume_from_checkpoint:
        changes.update(resume_from_checkpoint=None, resume_weights_only=False)
    if getattr(params, "pretrained", None):
        changes["pretrained"] = None
    if params.type == "vlm_foundry_backbone":
        changes["vlm_experiment_dir"] = vlm_dir
    return params.replace(**changes) if changes else params


def _backbone(params: ModelParams) -> ModelParams | None:
    bb = getattr(params, "vision_language_backbone", None)
    return bb if bb is not None and bb.type == "vlm_foundry_backbone" else None


def _unwrap(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip ``module.`` / ``_orig_mod.`` wrapper prefixes, judged on the first key (as the original does)."""
    while state_dict:
        first = next(iter(state_dict))
        prefix = next((p for p in ("_orig_mod.", "module.") if first.startswith(p)), None)
        if prefix is None:
            break
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return state_dict


def _load_state(path: str, key: str, fix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, the other plain entries) of the checkpoint file at ``path`` (local)."""
    obj = load_pt(path)
    if not isinstance(obj, dict) or not isinstance(obj.get(key), dict):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FoundryImportError(f"{path} holds no {key!r} (found {found}); {fix}")
    meta = {k: v for k, v in obj.items() if k != key and isinstance(v, (int, float, str, list)) and k != "optimizer"}
    if not any(isinstance(v, TensorRef) for v in obj[key].values()):
        raise FoundryImportError(f"{path}: its {key!r} holds no tensors.")
    return _unwrap(obj[key]), meta


def _abstract_params(params: ModelParams) -> Any:
    try:
        model = nnx.eval_shape(lambda: build_model(params, rngs=nnx.Rngs(0), load_weights=False))
    except VLAFoundryError as e:
        raise FoundryImportError(f"the original's model does not build here: {e}") from e
    return nnx.state(model, nnx.Param)


def _write_vlm_dir(directory: str, vlm: ModelParams) -> None:
    os.makedirs(directory, exist_ok=True)
    exp = TrainExperimentParams(name=BACKBONE_VLM, model=vlm, hparams=HyperParams(precision="fp32"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        f.write(exp.to_json())


def _check_output_dir(output_dir: str, flag: str) -> str:
    output_dir = paths.local_output_dir(output_dir, flag)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FoundryImportError(f"{flag}={output_dir} already exists and is not empty; give a new directory.")
    return output_dir


def import_foundry(source: str, output_dir: str, *, checkpoint: str | None = None, ema: bool = False) -> dict:
    """Import the original's experiment ``source`` as our run ``output_dir`` (module docstring); returns a summary."""
    t0 = time.perf_counter()
    output_dir = _check_output_dir(output_dir, "--output_dir")
    src = resolve_source(source)
    name, number = choose_checkpoint(src, checkpoint)
    present = set(_listdir(src, "the experiment directory", src))
    if "config.yaml" not in present:
        raise FoundryImportError(
            f"--source={source!r} has no config.yaml (the original writes it into every experiment directory); "
            f"give the experiment directory itself, not its checkpoints/."
        )
    config_path = paths.join(src, "config.yaml")
    cfg = load_config(config_path, "experiment", "config.yaml of a training run")
    model = cfg.experiment.model
    check_supported(model)
    source_vlm = None
    if _backbone(model) is not None:
        if "vlm_config_model.yaml" not in present:
            raise FoundryImportError(
                f"--source={source!r}: its vlm_foundry_backbone's VLM architecture is not there "
                f"(vlm_config_model.yaml, which the original bundles into published models); copy the VLM's "
                f"config_model.yaml there under that name."
            )
        vlm_yaml = paths.join(src, "vlm_config_model.yaml")
        source_vlm = _cleared(load_config(vlm_yaml, "model", "VLM config_model.yaml").params, None)
    ckpt_file = paths.join(src, "checkpoints", name)
    weights_file = paths.join(src, "checkpoints", f"ema_{number}.pt") if ema else ckpt_file
    if ema and f"ema_{number}.pt" not in _listdir(paths.join(src, "checkpoints"), "checkpoints/", src):
        raise FoundryImportError(
            f"--ema: {weights_file} does not exist (the run kept no EMA at checkpoint {number}); drop --ema."
        )
    fix = "is it a checkpoint_<N>.pt of the original?"
    state_dict, meta = _load_state(paths.local_file(ckpt_file), "state_dict", fix)
    if ema:
        state_dict, ema_meta = _load_state(paths.local_file(weights_file), "ema_state_dict", "is it an ema_<N>.pt?")
        meta["ema_optimization_step"] = ema_meta.get("ema_optimization_step")

    staging = f"{output_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(staging)
        vlm_dir = None
        if source_vlm is not None:
            _write_vlm_dir(os.path.join(staging, BACKBONE_VLM), source_vlm)
            vlm_dir = os.path.join(staging, BACKBONE_VLM)
        staged = _cleared(model, vlm_dir)
        stored = _cleared(model, None if vlm_dir is None else os.path.join(output_dir, BACKBONE_VLM))
        abstract = _abstract_params(staged)
        flat = ckpt_lib.flat_params(abstract)
        plan = foundry_rules(staged, flat, source_vlm=source_vlm, keys=state_dict)
        with PlanSource(StateDictSource(state_dict), plan) as tensors:
            (params,) = load_rules(
                tensors,
                plan.rules,
                [abstract],
                where=f"--source={source!r} ({weights_file})",
                ignore=plan.ignore,
                noun="checkpoint",
                hint="Is config.yaml the one this checkpoint was trained with?",
                error=FoundryImportError,
            )
        copied_data = {f for f in DATA_FILES if f in present}
        exp = cfg.experiment.replace(
            name=os.path.basename(output_dir),
            output_dir=output_dir,
            model=stored,
            data=_localized(cfg.experiment.data, output_dir, copied_data),
            async_checkpointing=False,
        )
        ckpt_lib.write_weights_run(staging, params, exp)
        with open(os.path.join(staging, "config.gin"), "w") as f:
            f.write(foundry_config_to_gin(dataclasses.replace(cfg, experiment=exp)))
        copied = []
        for fname in DATA_FILES:
            if fname in present:
                paths.write_bytes(os.path.join(staging, fname), paths.read_bytes(paths.join(src, fname)))
                copied.append(fname)
        os.makedirs(os.path.join(staging, FOUNDRY_DIR))
        kept = {n: state_dict[n].numpy() for n in plan.kept(state_dict) if isinstance(state_dict[n], TensorRef)}
        if kept:
            np.savez(os.path.join(staging, FOUNDRY_DIR, BUFFERS), **kept)
        for fname in CONFIG_FILES:
            if fname in present:
                data = paths.read_bytes(paths.join(src, fname))
                paths.write_bytes(os.path.join(staging, FOUNDRY_DIR, fname), data)
                copied.append(f"{FOUNDRY_DIR}/{fname}")
        record = {
            "source": source,
            "resolved": src,
            "checkpoint": name,
            "ema": ema,
            "checkpoint_num": meta.get("checkpoint_num", number),
            "global_step": meta.get("global_step"),
            "samples_seen": meta.get("samples_seen"),
            "ema_optimization_step": meta.get("ema_optimization_step"),
            "datastrings": meta.get("datastrings"),
        }
        with open(os.path.join(staging, METADATA), "w") as f:
            json.dump(record, f, indent=2)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked above)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    n = sum(int(np.prod(v.shape)) for v in ckpt_lib.flat_params(params).values())
    return {
        "output_dir": output_dir,
        "model_type": model.type,
        "checkpoint": name,
        "ema": ema,
        "global_step": record["global_step"],
        "samples_seen": record["samples_seen"],
        "params": n,
        "files_copied": copied,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _merged(base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """``ours`` over ``base``, mapping by mapping (keys only ``base`` has stay)."""
    out = dict(base)
    for key, value in ours.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value) if both else value
    return out


def _without_vlm_dir(model: dict[str, Any]) -> dict[str, Any]:
    """A ``vlm_foundry_backbone``'s ``vlm_experiment_dir`` dropped: the original then reads the VLM architecture
    from ``vlm_config_model.yaml`` beside ``config.yaml``, as for its published models."""
    bb = model.get("vision_language_backbone")
    if isinstance(bb, dict) and bb.get("type") == "vlm_foundry_backbone":
        model = dict(model, vision_language_backbone=dict(bb, vlm_experiment_dir=None))
    return model


def export_foundry(run_dir: str, out_dir: str) -> dict:
    """Write our run ``run_dir`` as the original's experiment layout in ``out_dir``; returns a summary."""
    t0 = time.perf_counter()
    out_dir = _check_output_dir(out_dir, "--out_dir")
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    model, exp = load_model(run_dir)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in ckpt_lib.flat_params(nnx.state(model, nnx.Param)).items()}
    bb = _backbone(exp.model)
    source_vlm = None
    if bb is not None:
        from vla_foundry_jax.models.vlm_backbones import source_vlm_params

        source_vlm = source_vlm_params(bb)
    plan = foundry_rules(exp.model, flat, source_vlm=source_vlm)
    buffers_file = os.path.join(run_dir, FOUNDRY_DIR, BUFFERS)
    kept = dict(np.load(buffers_file, allow_pickle=False)) if os.path.isfile(buffers_file) else {}
    state_dict = export_state_dict(exp.model, flat, plan, kept)
    meta_path = os.path.join(run_dir, METADATA)
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    step = int(os.path.basename(ckpt_lib.resolve_step_dir(run_dir)))
    number = int(meta.get("checkpoint_num") or 1)
    stored_config = os.path.join(run_dir, FOUNDRY_DIR, "config.yaml")
    original = _read_yaml(stored_config, "config.yaml") if os.path.isfile(stored_config) else {}
    # the original's fields without meaning here (wandb, torch.distributed, ...) as imported; ours over them
    config = _merged(original or {}, params_to_foundry_yaml(exp))
    config["model"] = _without_vlm_dir(config["model"])
    staging = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(os.path.join(staging, "checkpoints"))
        with open(os.path.join(staging, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        with open(os.path.join(staging, "config_model.yaml"), "w") as f:
            yaml.safe_dump(config["model"], f, sort_keys=False)
        if source_vlm is not None:
            with open(os.path.join(staging, "vlm_config_model.yaml"), "w") as f:
                yaml.safe_dump(
                    params_to_foundry_yaml(TrainExperimentParams(model=source_vlm))["model"], f, sort_keys=False
                )
        for fname in DATA_FILES:
            if os.path.isfile(os.path.join(run_dir, fname)):
                shutil.copyfile(os.path.join(run_dir, fname), os.path.join(staging, fname))
        checkpoint = {
            "checkpoint_num": number,
            "state_dict": OrderedDict(sorted(state_dict.items())),
            "datastrings": meta.get("datastrings") or [],
            "curr_shard_idx_per_dataset": [],
            "samples_seen": int(meta.get("samples_seen") or 0),
            "global_step": int(meta["global_step"]) if meta.get("global_step") is not None else step,
            "shard_shuffle_seed_per_dataset": [],
        }
        save_pt(checkpoint, os.path.join(staging, "checkpoints", f"checkpoint_{number}.pt"))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "out_dir": out_dir,
        "model_type": exp.model.type,
        "checkpoint": f"checkpoints/checkpoint_{number}.pt",
        "tensors": len(state_dict),
        "seconds": round(time.perf_counter() - t0, 2),
    }
