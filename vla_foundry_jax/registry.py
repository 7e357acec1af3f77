"""Type key -> params class, model builder and loss.

Every params class registers itself under its ``type`` key (see ``params.base.register_params``); model
families register a builder and, for trainable top-level models, a loss under the same key.
``build_model(params, rngs=...)`` is the single entry point that turns a params object into a module.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

PARAMS: dict[str, type] = {}
BUILDERS: dict[str, Callable[..., Any]] = {}
LOSSES: dict[str, Callable[..., Any]] = {}
WEIGHT_LOADERS: dict[str, Callable[..., Any]] = {}
BATCH_CHECKS: dict[str, Callable[..., Any]] = {}
FROZEN_PATHS: dict[str, Callable[..., Any]] = {}
RESUME_LOADERS: dict[str, Callable[..., Any]] = {}


class UnknownTypeError(ValueError):
    """A ``type`` key that no params class is registered under."""


class NotBuiltYetError(NotImplementedError):
    """A registered params type whose model builder does not exist (yet)."""


def _closest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
    return f" Did you mean {match[0]!r}?" if match else ""


def _register(table: dict[str, Any], kind: str, key: str, value: Any) -> None:
    if key in table and table[key] is not value:
        raise ValueError(f"{kind} {key!r} is registered twice ({table[key]} and {value}).")
    table[key] = value


def register_builder(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(params, *, rngs, **kw) -> nnx.Module`` builds models of type ``key``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(BUILDERS, "model builder", key, fn)
        return fn

    return deco


def register_loss(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(model, batch, *, hparams, rng) -> (loss, metrics)`` trains type ``key``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(LOSSES, "loss", key, fn)
        return fn

    return deco


def register_weight_loader(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(params, states, prefix) -> states`` fills a built model's weights from outside sources.

    Called once after initialisation for every (sub-)model of type ``key`` (e.g. ``vit.pretrained``);
    ``states`` are the model's ``nnx.State`` parts (trainable, frozen) and ``prefix`` is the sub-model's
    dotted module path (``""`` at the top, ``"vit."`` inside a VLM). Returns the updated states.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(WEIGHT_LOADERS, "weight loader", key, fn)
        return fn

    return deco


def register_batch_check(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(params, host_batch)`` raises a clear error for a batch the model cannot take.

    Runs on the host before each step (data-dependent checks cannot raise inside ``jax.jit``).
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(BATCH_CHECKS, "batch check", key, fn)
        return fn

    return deco


def register_frozen_paths(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(params) -> [module path tuple, ...]`` that a model of type ``key`` freezes by its own
    flags (e.g. CLIP's ``freeze_text_encoder`` -> ``("text_model",)``), besides ``freeze=True`` sub-models."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(FROZEN_PATHS, "frozen-paths hook", key, fn)
        return fn

    return deco


def register_resume_loader(key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(params, states, prefix) -> states`` loads a nested sub-model's own
    ``resume_from_checkpoint`` when that names a run of another type (``vlm_foundry_backbone`` starts from a
    ``vlm`` run); the training loop calls it instead of its same-type weights-only restore."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(RESUME_LOADERS, "resume loader", key, fn)
        return fn

    return deco


def params_class(key: str, *, family: str | None = None) -> type:
    """The params class registered under ``key``; ``family`` (e.g. 'model', 'data') restricts the lookup."""
    known = sorted(k for k, c in PARAMS.items() if family is None or c.family == family)
    if key not in known:
        what = f"{family} type" if family else "type"
        raise UnknownTypeError(
            f"Unknown {what} {key!r}. Registered {what}s: {', '.join(known)}.{_closest(str(key), known)}"
        )
    return PARAMS[key]


def _lookup(table: dict[str, Any], kind: str, key: str) -> Any:
    if key in table:
        return table[key]
    if key in PARAMS:
        raise NotBuiltYetError(
            f"type {key!r} has params but no {kind} in vla_foundry_jax yet; it cannot be used as a "
            f"top-level model. Types with a {kind}: {', '.join(sorted(table))}."
        )
    known = sorted(table)
    raise UnknownTypeError(f"Unknown type {key!r}. Registered types: {', '.join(known)}.{_closest(key, known)}")


def build_model(params: Any, *, rngs: Any, **kwargs: Any) -> Any:
    """Build the NNX module for ``params`` by dispatching on ``params.type``."""
    _ensure_models_imported()
    return _lookup(BUILDERS, "model builder", params.type)(params, rngs=rngs, **kwargs)


def get_loss(key: str) -> Callable[..., Any]:
    """The loss registered for model type ``key``."""
    _ensure_models_imported()
    return _lookup(LOSSES, "loss", key)


def _ensure_models_imported() -> None:
    import vla_foundry_jax.models
    import vla_foundry_jax.training.losses  # noqa: F401  (registers losses)
