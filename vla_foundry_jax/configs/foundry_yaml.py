"""The original VLA Foundry's draccus YAML (an experiment's ``config.yaml`` or a preset) <-> our params and gin.

The original loads YAML with PyYAML plus two draccus extensions: ``key: !include other.yaml`` (the path relative to
the including file) and ``<<: !include other.yaml`` (a shallow YAML merge of an included mapping; with several
``<<`` keys the later one wins, and the mapping's own keys win over every merge), then applies command-line
overrides ``--a.b.c value`` (a value ``include path.yaml`` loads a file). Missing fields take the dataclass
defaults; a nested model without ``type`` takes the first class of its field's union that has every key given.

Here every field is mapped by name onto ``TrainExperimentParams`` (our field names follow the original). Fields
that mean nothing in this port (torch.distributed and FSDP wiring, wandb / DynamoDB / S3 sync, webdataset shuffle
buffers, ...) are dropped and listed once in the log and in ``FoundryConfig.ignored``; so is a key the original
drops itself because it belongs to another type (``hidden_dim`` on a ``transformer_hf``). Any other key is an
error naming it. A preset may hold a whole experiment or one section of it (a model, a data, an hparams preset,
an image augmentation block); ``section`` says which.

``foundry_config_to_gin`` writes the gin that ``launch.train --gin_file`` parses back to the same params;
``params_to_foundry_yaml`` is the inverse mapping (for export to the original).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from vla_foundry_jax import paths, registry
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params import (
    DataParams,
    DistributedParams,
    EMAParams,
    HyperParams,
    ImageAugmentationParams,
    RoboticsDataParams,
    TextDataParams,
    TrainExperimentParams,
    UNetParams,
)
from vla_foundry_jax.params.base import POLYMORPHIC_FAMILIES, BaseParams, ParamsError, closest_name, params_from_dict

log = logging.getLogger(__name__)

INCLUDE_TAG = "!include"
DEFAULT_SAVE_PATH = "experiments"  # the original's experiment directory is <save_path or experiments>/<name>


class FoundryConfigError(VLAFoundryError, ValueError):
    """A VLA Foundry YAML that cannot be converted; the message names the file, the field and the fix."""


@dataclasses.dataclass(frozen=True)
class FoundryConfig:
    """A converted YAML. ``experiment`` holds every section the YAML gives (the rest at our defaults);
    ``section`` is what the file describes (``experiment``, ``model``, ``data``, ``hparams``, ``ema``,
    ``distributed`` or ``image_augmentation``) and ``params`` that section's params object. ``raw`` is the YAML
    after includes, merges and overrides, as an experiment-level dict."""

    experiment: TrainExperimentParams
    ignored: list[str]
    raw: dict
    section: str = "experiment"
    params: BaseParams | None = None
    source: str = ""


# ----------------------------------------------------------------------------------------------------------
# What the original has that we do not (dropped, with the reason) and what we have that the original does not.

_TORCH_DIST = "torch.distributed wiring; JAX's runtime finds the processes and devices"
IGNORED_FIELDS: dict[type, dict[str, str]] = {
    TrainExperimentParams: {
        "resolve_configs": "a dry-run switch of the original's main.py",
        "resolve_configs_path": "a dry-run switch of the original's main.py",
        "wandb": "wandb is off in this config (with `wandb: true` it maps onto experiment.wandb_*)",
        "db_logging": "the original's DynamoDB dashboard",
        "wandb_entity": "wandb is off in this config",
        "wandb_project_name": "wandb is off in this config",
        "wandb_tags": "wandb is off in this config",
        "remote_sync": "output_dir may itself be s3:// or gs://",
        "remote_sync_fixed_path": "output_dir may itself be s3:// or gs://",
    },
    DistributedParams: {
        "dist_url": _TORCH_DIST,
        "dist_backend": _TORCH_DIST,
        "fsdp": "sharding is distributed.fsdp_parallelism here (a device mesh), not torch FSDP",
        "fsdp_cpu_offload": "torch FSDP setting",
        "fsdp_reshard_after_forward": "torch FSDP setting",
        "ddp_static_graph": "torch DDP setting",
        "use_distributed": _TORCH_DIST,
        "world_size": "derived at run time",
        "rank": "derived at run time",
        "local_rank": "derived at run time",
        "device": "derived at run time",
    },
    HyperParams: {
        "torchcompile": "torch.compile; every step is jax.jit-compiled here",
        "world_size": "derived at run time",
    },
    DataParams: {
        "use_hf_fast_tokenizer": "the tokenizer is loaded by transformers' AutoTokenizer",
        "hf_fast_tokenizers_parallelism": "tokenizers thread setting",
        "hf_fast_tokenizer_rayon_threads": "tokenizers thread setting",
        "dataloader_in_order": "torch DataLoader setting",
        "dataset_cache": "webdataset shard cache",
        "val_dataset_weighting": "validation reads every val manifest in order, unweighted",
    },
    RoboticsDataParams: {
        "val_dataset_statistics": "validation is normalised with the training statistics (as the original does)",
        "pose_groups": "relative poses are not computed here (no model reads them)",
        "intrinsics_fields": "no policy here reads camera intrinsics",
        "extrinsics_fields": "no policy here reads camera extrinsics",
        "point_cloud_num_points": "point clouds are not supported here",
    },
}

# Our fields the original lacks: never written to its YAML.
OURS_ONLY: dict[type, set[str]] = {
    TrainExperimentParams: {
        "output_dir",
        "async_checkpointing",
        "sample_prompt",
        "sample_max_new_tokens",
        "wandb_project",
        "wandb_entity",
        "wandb_run_name",
        "wandb_tags",
        "wandb_group",
    },
    DistributedParams: {f.name for f in dataclasses.fields(DistributedParams)},
    HyperParams: {"remat_policy", "nonfinite_policy", "max_consecutive_nonfinite"},
    DataParams: {"max_bad_sample_fraction", "streaming", "num_streams"},
    TextDataParams: {"tokenizer"},
    RoboticsDataParams: {"tokenizer"},
    UNetParams: {"hf_pretrained"},
}

# Renamed fields of the original (its own migration table): (class, old) -> new.
RENAMED = {(ImageAugmentationParams, "random_crop"): "crop"}

# Preset sections other than a whole experiment, tried on a mapping without a registered ``type``.
SECTIONS: dict[str, type] = {
    "hparams": HyperParams,
    "ema": EMAParams,
    "distributed": DistributedParams,
    "image_augmentation": ImageAugmentationParams,
}
# Where each section lives in the experiment-level dict (overrides use these paths).
SECTION_PATH = {
    "model": ("model",),
    "data": ("data",),
    "hparams": ("hparams",),
    "ema": ("ema",),
    "distributed": ("distributed",),
    "image_augmentation": ("data", "augmentation", "image"),
}


def _table(table: dict[type, Any], cls: type) -> list[Any]:
    return [v for k, v in table.items() if issubclass(cls, k)]


def _ignored_fields(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in _table(IGNORED_FIELDS, cls):
        out.update(t)
    return out


def _ours_only(cls: type) -> set[str]:
    return set().union(*_table(OURS_ONLY, cls))


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _original_fields(cls: type) -> set[str]:
    return (set(_fields(cls)) - _ours_only(cls)) | set(_ignored_fields(cls))


def _family_fields(family: str) -> set[str]:
    """Every field name some params class of ``family`` has in the original (a key it drops, not a typo)."""
    names: set[str] = set()
    for cls in registry.PARAMS.values():
        if cls.family == family:
            names |= _original_fields(cls)
    return names


# ----------------------------------------------------------------------------------------------------------
# YAML with !include and <<: merges


def _read_text(path: str) -> str:
    if not paths.exists(path):
        raise FoundryConfigError(f"config {path!r} does not exist; give the path of a VLA Foundry YAML.")
    if paths.isdir(path):
        raise FoundryConfigError(
            f"config {path!r} is a directory; give its config.yaml (an experiment's) or a preset .yaml file."
        )
    try:
        return paths.read_text(path)
    except UnicodeDecodeError:
        raise FoundryConfigError(f"config {path!r} is not a text file; give a VLA Foundry YAML.") from None


def _normpath(path: str) -> str:
    if paths.is_remote(path):
        kind, rest = path.split("://", 1)
        return f"{kind}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def _include_target(including: str, name: str) -> str:
    """``name`` relative to the directory of the file that includes it (an absolute path or URL as given)."""
    if "://" in name or os.path.isabs(name):
        return _normpath(name)
    return _normpath(paths.join(paths.dirname(including), name))


def _compose(path: str, stack: tuple[str, ...] = ()) -> yaml.Node | None:
    """The YAML node tree of ``path`` with every ``!include`` replaced by the included file's tree."""
    path = _normpath(path)
    if path in stack:
        chain = " -> ".join([*stack, path])
        raise FoundryConfigError(f"{stack[-1]}: !include cycle {chain}; remove one of these includes.")
    text = _read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FoundryConfigError(f"{path} is not valid YAML{where}: {problem}; fix the file.") from None
    return _resolve_includes(node, path, (*stack, path))


def _resolve_includes(node: yaml.Node | None, path: str, stack: tuple[str, ...]) -> yaml.Node | None:
    if node is None:
        return None
    if isinstance(node, yaml.ScalarNode) and node.tag == INCLUDE_TAG:
        target = _include_target(path, node.value.strip())
        if not paths.exists(target):
            raise FoundryConfigError(
                f"{path} line {node.start_mark.line + 1}: !include {node.value!r} names no file ({target}); "
                "includes are relative to the including file."
            )
        included = _compose(target, stack)
        return included if included is not None else yaml.ScalarNode("tag:yaml.org,2002:null", "")
    if isinstance(node, yaml.SequenceNode):
        node.value = [_resolve_includes(v, path, stack) for v in node.value]
    elif isinstance(node, yaml.MappingNode):
        node.value = [(k, _resolve_includes(v, path, stack)) for k, v in node.value]
    return node


def load_yaml(path: str) -> Any:
    """The data of a VLA Foundry YAML file, includes and merges resolved (the original's loader semantics)."""
    node = _compose(path)
    if node is None:
        return None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FoundryConfigError(f"{path}: {problem}; fix the file.") from None
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------------------------------------
# Overrides (draccus' --a.b.c value)


def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is YAML (``include file.yaml`` loads a file, as draccus does)."""
    key, sep, text = override.removeprefix("--").partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(p.strip() for p in parts):
        raise FoundryConfigError(
            f"override {override!r} must read key.path=value (e.g. model.hidden_dim=512 or "
            "model.transformer='include transformer_100m.yaml')."
        )
    text = text.strip()
    if text.startswith("include "):
        value = load_yaml(text[len("include ") :].strip())
    else:
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise FoundryConfigError(f"override {override!r}: the value is not valid YAML ({problem}).") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise FoundryConfigError(
                f"override {override!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a section with fields; "
                "override it whole or fix the key."
            )
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------------------
# Field-by-field conversion


@dataclasses.dataclass
class _Context:
    source: str
    ignored: list[str] = dataclasses.field(default_factory=list)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    def ignore(self, where: str, reason: str) -> None:
        if where not in self.reasons:
            self.ignored.append(where)
            self.reasons[where] = reason

    def error(self, message: str) -> FoundryConfigError:
        return FoundryConfigError(f"{self.source}: {message}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _params_members(hint: Any) -> list[type]:
    args = typing.get_args(hint) if _is_union(hint) else (hint,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseParams)]


def _allows_none(hint: Any) -> bool:
    return hint is Any or hint is type(None) or (_is_union(hint) and type(None) in typing.get_args(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """The YAML value as draccus decodes it for ``hint``: ``5e-4`` (a string to PyYAML) is a float, a number given
    for a string field is its text. Anything else is left for the params' own check to judge."""
    if value is None or hint is Any:
        return value
    if _is_union(hint):
        for arg in typing.get_args(hint):
            if arg is not type(None):
                coerced = _coerce(value, arg)
                if coerced is not value:
                    return coerced
        return value
    origin = typing.get_origin(hint)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) == len(value):
            return [_coerce(v, a) for v, a in zip(value, args, strict=True)]
        elem = args[0] if args else Any
        return [_coerce(v, elem) for v in value]
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if hint is int and isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            return value
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _pick_class(raw: dict, hint: Any, where: str, ctx: _Context) -> type:
    """The params class a nested dict becomes: its ``type`` key, else the first member of the field's union that
    has every key (draccus tries the union in order), else the field's class."""
    members = _params_members(hint)
    family = members[0].family
    type_key = raw.get("type") if family in POLYMORPHIC_FAMILIES else None
    if type_key is not None and not isinstance(type_key, str):
        raise ctx.error(f"{_join(where, 'type')} must be a type name, got {type_key!r}.")
    if type_key is not None:
        cls = registry.PARAMS.get(type_key)
        known = sorted(k for k, c in registry.PARAMS.items() if c.family == family)
        if cls is None or cls.family != family:
            raise ctx.error(
                f"{where}.type = {type_key!r} is not a {family} type of this project."
                f"{closest_name(str(type_key), known)} Known: {', '.join(known)}."
            )
        if not any(issubclass(cls, m) for m in members):
            takes = sorted(k for k, c in registry.PARAMS.items() if any(issubclass(c, m) for m in members))
            raise ctx.error(f"{where}.type = {type_key!r} does not fit here; {where} takes one of {takes}.")
        return cls
    concrete = [m for m in members if m.type_key is not None or family not in POLYMORPHIC_FAMILIES]
    if not concrete:
        raise ctx.error(f"{where} has no `type`; add {where}.type (one of the registered {family} types).")
    keys = set(raw) - {"type"}
    for cls in concrete:
        if keys <= _original_fields(cls) | set(_fields(cls)):
            return cls
    return concrete[0]


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(raw: Any, hint: Any, where: str, ctx: _Context) -> BaseParams:
    if not isinstance(raw, dict):
        raise ctx.error(f"{where or 'the config'} must be a mapping of fields, got {type(raw).__name__} {raw!r}.")
    cls = _pick_class(raw, hint, where, ctx)
    fields = _fields(cls)
    ignored = _ignored_fields(cls)
    family_fields = _family_fields(cls.family) if cls.family in POLYMORPHIC_FAMILIES else set()
    hints = typing.get_type_hints(cls)
    renamed = {old: new for (c, old), new in RENAMED.items() if issubclass(cls, c)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = renamed.get(key, key)
        if name != key:
            if name in raw:
                continue
            log.warning("%s: %s is the old name of %s", ctx.source, _join(where, key), _join(where, name))
        here = _join(where, name)
        if name == "type" and cls.family in POLYMORPHIC_FAMILIES:
            continue
        if name in ignored:
            ctx.ignore(here, ignored[name])
        elif name in fields:
            field_hint = hints[name]
            if value is None and not _allows_none(field_hint):
                ctx.ignore(here, "null: the default is kept")
            elif isinstance(value, dict) and _params_members(field_hint):
                kwargs[name] = _convert(value, field_hint, here, ctx)
            else:
                kwargs[name] = _coerce(value, field_hint)
        elif name in family_fields:
            ctx.ignore(here, f"not a field of {cls.type_key} (the original drops it too)")
        else:
            known = sorted(_original_fields(cls))
            raise ctx.error(
                f"unknown field {here!r} for {cls.type_key or cls.__name__}.{closest_name(name, known)} "
                f"Remove it or fix its name; fields: {', '.join(known)}."
            )
    for f in dataclasses.fields(cls):
        if f.name not in kwargs:
            kwargs[f.name] = _field_default(f)
    try:
        return cls(**kwargs)
    except ParamsError as e:
        # gin appends "In call to configurable ..." lines; the params message names the field and the fix.
        raise ctx.error(str(e).split("\n  In call to configurable")[0]) from None


def _convert_experiment(raw: dict, ctx: _Context) -> TrainExperimentParams:
    raw = dict(raw)
    save_path = raw.pop("save_path", None)
    if raw.get("name") is not None and "output_dir" not in raw:
        raw["output_dir"] = f"{(save_path or DEFAULT_SAVE_PATH).rstrip('/')}/{raw['name']}"
    elif save_path is not None:
        ctx.ignore("save_path", "no `name`: the original names the run at launch; set experiment.output_dir")
    for key in ("model", "data"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ctx.error(f"{key} must be a mapping with a `type`, got {raw[key]!r}.")
    tracked: dict[str, Any] = {}
    if raw.get("wandb") and raw.get("wandb_project_name"):  # the original's switch + names -> experiment.wandb_*
        del raw["wandb"]
        tracked["wandb_project"] = str(raw.pop("wandb_project_name"))
        entity, tags = raw.pop("wandb_entity", None), raw.pop("wandb_tags", None)
        if entity is not None:
            tracked["wandb_entity"] = str(entity)
        if tags:
            tracked["wandb_tags"] = tuple(str(t) for t in tags)
    experiment = _convert(raw, TrainExperimentParams, "", ctx)
    return experiment.replace(**tracked) if tracked else experiment


def _unshared(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _section_of(data: Any, ctx: _Context) -> str:
    """Which part of a training config ``data`` describes."""
    if not isinstance(data, dict):
        raise ctx.error(
            f"holds a {type(data).__name__}, not a training config: it is a fragment for `!include` inside one "
            "(convert the config that includes it)."
        )
    experiment_keys = _original_fields(TrainExperimentParams) | set(_fields(TrainExperimentParams)) | {"save_path"}
    if set(data) & {"model", "data", "hparams", "ema", "distributed"} or (data and set(data) <= experiment_keys):
        return "experiment"
    for section, cls in SECTIONS.items():
        typed = getattr(registry.PARAMS.get(str(data.get("type"))), "family", None) in POLYMORPHIC_FAMILIES
        if data and not typed and set(data) <= _original_fields(cls) | set(_fields(cls)):
            return section
    if "type" in data:
        cls = registry.PARAMS.get(str(data["type"]))
        if cls is not None and cls.family in POLYMORPHIC_FAMILIES:
            return cls.family
        known = sorted(k for k, c in registry.PARAMS.items() if c.family in POLYMORPHIC_FAMILIES)
        raise ctx.error(
            f"type {data['type']!r} is no model or data type of this project.{closest_name(str(data['type']), known)}"
            f" Known: {', '.join(known)}."
        )
    raise ctx.error(
        f"is not a training config: none of its keys ({', '.join(map(str, list(data)[:8]))}) is a section of one "
        "(model, data, hparams, ema, distributed) and it has no model or data `type` (a preprocessing or cluster "
        "config?)."
    )


def load_foundry_config(path: str, overrides: Sequence[str] = ()) -> FoundryConfig:
    """Read a VLA Foundry YAML (``config.yaml`` of an experiment or a ``config_presets/`` file), apply ``overrides``
    (``a.b.c=value``, experiment-level keys: ``model.hidden_dim=512`` also for a model preset) and map it onto our
    params. Raises ``FoundryConfigError`` naming the file and field for anything that cannot be mapped."""
    ctx = _Context(source=str(path))
    data = load_yaml(str(path))
    if data is None:
        raise ctx.error("is empty; give a VLA Foundry training config or preset.")
    section = _section_of(data, ctx)
    data = _unshared(data)  # YAML anchors share objects; an override must change one place only
    if section == "experiment":
        raw = data
    else:
        raw = {}
        node = raw
        for part in SECTION_PATH[section][:-1]:
            node = node.setdefault(part, {})
        node[SECTION_PATH[section][-1]] = data
    for override in overrides:
        apply_override(raw, override)
    if section == "image_augmentation":
        sub = raw.get("data", {}).get("augmentation", {})
        params = _convert(sub.get("image") or {}, ImageAugmentationParams, "data.augmentation.image", ctx)
        extra = set(raw) - {"data"} or set(raw["data"]) - {"augmentation"} or set(sub) - {"image"}
        if extra:
            raise ctx.error(f"overrides {sorted(extra)} do not apply to an image augmentation preset.")
        experiment = TrainExperimentParams()
    else:
        experiment = _convert_experiment(raw, ctx)
        params = experiment if section == "experiment" else getattr(experiment, section)
    if ctx.ignored:
        log.warning(
            "%s: ignored %d field(s) with no meaning in vla_foundry_jax: %s",
            path,
            len(ctx.ignored),
            "; ".join(f"{k} ({ctx.reasons[k]})" for k in ctx.ignored),
        )
    return FoundryConfig(
        experiment=experiment,
        ignored=list(ctx.ignored),
        raw=raw,
        section=section,
        params=params,
        source=str(path),
    )


# ----------------------------------------------------------------------------------------------------------
# Gin


def _gin_literal(value: Any) -> str:
    if isinstance(value, BaseParams):
        value = value.to_dict()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_gin_literal(k)}: {_gin_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_gin_literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_gin_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, (str, bool, int, float)) or value is None:
        return repr(value)
    raise TypeError(f"no gin literal for {type(value).__name__} {value!r}")


def _field_default(f: dataclasses.Field) -> Any:
    """The class default of ``f``, never a live gin binding (params classes are gin configurables)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory = f.default_factory
    if isinstance(factory, type) and issubclass(factory, BaseParams):
        return params_from_dict({}, factory, family=factory.family)
    if factory is not dataclasses.MISSING:
        return factory()
    return dataclasses.MISSING


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _gin_blocks(obj: BaseParams, blocks: list[list[str]], seen: dict[str, BaseParams]) -> None:
    """One block of ``name.field = value`` lines per params object (non-default fields; a nested params object at
    its field's default is left to the default), depth first."""
    name = obj.gin_name
    if name in seen:
        if seen[name] != obj:
            raise FoundryConfigError(
                f"two different {name} params in one config cannot share unscoped gin bindings; write this gin by hand."
            )
        return
    seen[name] = obj
    lines: list[str] = []
    nested = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "type" and obj.family in POLYMORPHIC_FAMILIES:
            continue
        if _frozen(value) == _frozen(_field_default(f)):
            continue
        if isinstance(value, BaseParams):
            lines.append(f"{name}.{f.name} = @{value.gin_name}()")
            nested.append(value)
        else:
            lines.append(f"{name}.{f.name} = {_gin_literal(value)}")
    if lines:
        blocks.append(lines)
    for value in nested:
        _gin_blocks(value, blocks, seen)


def foundry_config_to_gin(cfg: FoundryConfig) -> str:
    """Gin bindings that ``launch.train --gin_file`` (``gin_utils.parse_gin``) parses back to ``cfg``'s params:
    the experiment's non-default fields (an image augmentation preset: its own)."""
    lines = [f"# Converted from the VLA Foundry config {cfg.source} (python -m launch.foundry_config)."]
    if cfg.ignored:
        lines.append("# Ignored (no meaning in vla_foundry_jax):")
        lines += [f"#   {k}" for k in cfg.ignored]
    blocks: list[list[str]] = []
    _gin_blocks(cfg.params if cfg.section == "image_augmentation" else cfg.experiment, blocks, {})
    return "\n\n".join("\n".join(block) for block in [lines, *blocks]) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Ours -> the original's YAML


def _to_yaml_value(value: Any) -> Any:
    if isinstance(value, BaseParams):
        return _export(value)
    if isinstance(value, (list, tuple)):
        return [_to_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_yaml_value(v) for k, v in value.items()}
    return value


def _export(obj: BaseParams) -> dict:
    skip = _ours_only(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        if f.name not in skip:
            out[f.name] = _to_yaml_value(getattr(obj, f.name))
    return out


def params_to_foundry_yaml(experiment: TrainExperimentParams) -> dict:
    """The original's ``config.yaml`` dict for ``experiment`` (the inverse of ``load_foundry_config`` on the
    mapped fields): our-only fields are left out, ``output_dir`` becomes ``save_path`` / ``name``, and a missing
    model or data section is left out."""
    out = _export(experiment)
    out.pop("distributed", None)
    if experiment.wandb_project:
        out.update(wandb=True, wandb_project_name=experiment.wandb_project, wandb_entity=experiment.wandb_entity)
        out["wandb_tags"] = list(experiment.wandb_tags)
    for key in ("model", "data"):
        if out.get(key) is None:
            out.pop(key, None)
    if experiment.output_dir:
        head, _, tail = experiment.output_dir.rstrip("/").rpartition("/")
        out["name"] = tail  # the original's run directory is <save_path>/<name>
        out["save_path"] = None if head in ("", DEFAULT_SAVE_PATH) else head
    return out


def foundry_yaml_to_gin(path: str, overrides: Sequence[str] = ()) -> str:
    """``launch.foundry_config``: the gin text of the VLA Foundry YAML at ``path`` with ``overrides`` applied."""
    return foundry_config_to_gin(load_foundry_config(path, overrides))
