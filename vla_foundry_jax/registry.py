"""Type key -> params class and model record: the bottom floor of the package.

Every params class registers itself under its ``type`` key (``params.base.register_params``). Every model
family declares one :class:`ModelRecord` per model type next to its code (``register_model``): the builder,
the loss, the weight loader, the batch check, the frozen paths and the resume loader of that type, together.
This module imports nothing from the package and does no I/O; ``vla_foundry_jax.models`` imports every
family (so every record exists once the package is imported) and holds ``build_model``, which also loads
the weights the params name.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from vla_foundry_jax.errors import VLAFoundryError

PARAMS: dict[str, type] = {}
RECORDS: dict[str, ModelRecord] = {}


class UnknownTypeError(VLAFoundryError, ValueError):
    """A ``type`` key that no params class is registered under."""


class NotBuiltYetError(VLAFoundryError, NotImplementedError):
    """A registered params type whose model builder does not exist (yet)."""


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """Everything the framework knows about one model type.

    ``params``: the params class (its ``type_key`` is the record's key). ``builder(params, *, rngs, **kw)``
    returns the ``nnx.Module`` with random weights; None for a type built only inside its parent (``unet``).
    ``loss(model, batch, *, hparams, rng) -> (loss, metrics)`` for a type trained at the top level.
    ``weight_loader(params, states, prefix) -> states`` fills a built (sub-)model's weights from the outside
    source its params name (``hf_pretrained``, ``pretrained``); ``states`` are ``nnx.State`` parts, ``prefix``
    the sub-model's dotted path (``""`` at the top, ``"vit."`` inside a VLM). ``batch_check(params,
    host_batch)`` raises a clear error for a batch the model cannot take (on the host, before each step).
    ``frozen_paths(params) -> [path tuple, ...]`` are module paths the type freezes by its own flags.
    ``resume_loader(params, states, prefix) -> states`` replaces the same-type weights-only restore when a
    sub-model's ``resume_from_checkpoint`` names a run of another type (a ``vlm`` run into a backbone).
    ``eval_metrics(model, batch, rng) -> {name: scalar}``: held-out figures beyond the loss that validation during
    training logs (a policy's sampled-action error); traceable under ``jax.jit``.
    """

    params: type
    builder: Callable[..., Any] | None
    loss: Callable[..., Any] | None = None
    weight_loader: Callable[..., Any] | None = None
    batch_check: Callable[..., Any] | None = None
    frozen_paths: Callable[..., Any] | None = None
    resume_loader: Callable[..., Any] | None = None
    eval_metrics: Callable[..., Any] | None = None

    @property
    def type(self) -> str:
        return self.params.type_key


def _closest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
    return f" Did you mean {match[0]!r}?" if match else ""


def _register(table: dict[str, Any], kind: str, key: str, value: Any) -> None:
    if key in table and table[key] is not value:
        raise ValueError(f"{kind} {key!r} is registered twice ({table[key]} and {value}).")
    table[key] = value


def register_model(record: ModelRecord) -> ModelRecord:
    """Declare the record of one model type; its params class must be registered under the same key."""
    key = record.type
    if key is None or PARAMS.get(key) is not record.params:
        raise ValueError(
            f"{record.params.__name__} is not a registered params class; decorate it with register_params."
        )
    if record.loss is not None and record.builder is None:
        raise ValueError(f"model type {key!r} has a loss but no builder.")
    if key in RECORDS and RECORDS[key] != record:
        raise ValueError(f"model type {key!r} is registered twice ({RECORDS[key]} and {record}).")
    RECORDS[key] = record
    return record


def params_class(key: str, *, family: str | None = None) -> type:
    """The params class registered under ``key``; ``family`` (e.g. 'model', 'data') restricts the lookup."""
    known = sorted(k for k, c in PARAMS.items() if family is None or c.family == family)
    if key not in known:
        what = f"{family} type" if family else "type"
        raise UnknownTypeError(
            f"Unknown {what} {key!r}. Registered {what}s: {', '.join(known)}.{_closest(str(key), known)}"
        )
    return PARAMS[key]


def model_record(key: str) -> ModelRecord:
    """The record of model type ``key`` (unknown keys list the registered ones and the closest match)."""
    if key in RECORDS:
        return RECORDS[key]
    if key in PARAMS:
        raise NotBuiltYetError(f"type {key!r} has params but no model record in vla_foundry_jax.")
    known = sorted(RECORDS)
    raise UnknownTypeError(f"Unknown type {key!r}. Registered types: {', '.join(known)}.{_closest(key, known)}")


def _required(key: str, field: str, kind: str) -> Callable[..., Any]:
    fn = getattr(model_record(key), field)
    if fn is None:
        have = sorted(k for k, r in RECORDS.items() if getattr(r, field) is not None)
        raise NotBuiltYetError(
            f"type {key!r} has params but no {kind} in vla_foundry_jax yet; it cannot be used as a "
            f"top-level model. Types with a {kind}: {', '.join(have)}."
        )
    return fn


def build_module(params: Any, *, rngs: Any, **kwargs: Any) -> Any:
    """The NNX module for ``params`` with freshly initialised weights (no I/O).

    Parents build their sub-models with this; ``vla_foundry_jax.models.build_model`` is the public entry
    that also loads the weights the params name.
    """
    return _required(params.type, "builder", "model builder")(params, rngs=rngs, **kwargs)


def get_loss(key: str) -> Callable[..., Any]:
    """The loss of model type ``key``."""
    return _required(key, "loss", "loss")
