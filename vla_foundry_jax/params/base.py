"""Frozen params dataclasses: registration under a ``type`` key, gin binding, validation, JSON round-trip.

Every params class is a frozen dataclass decorated with ``register_params(key, family)``, which
  * registers it in ``registry.PARAMS`` under ``key`` and makes it gin-configurable under the same name
    (``transformer.n_layers = 12``; the class stays bound to its own name),
  * fills ``type`` with ``key`` when it is not given (for families that carry a ``type`` field),
  * checks every field against its annotation, coercing ``int -> float`` and ``list -> tuple`` so that
    params are hashable (they are static attributes of NNX modules and jit keys).
``to_dict`` / ``params_from_dict`` round-trip through JSON; nested polymorphic fields are rebuilt from
their stored ``type``, never from ``isinstance`` guesses.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import gin

from vla_foundry_jax import registry
from vla_foundry_jax.errors import VLAFoundryError

T = TypeVar("T")


POLYMORPHIC_FAMILIES = ("model", "data")  # families whose ``type`` field is a registry key


class ParamsError(VLAFoundryError, ValueError):
    """A params field holds a value it cannot take; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class BaseParams:
    """Base of every params dataclass."""

    family: ClassVar[str] = "config"
    type_key: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        cls = type(self)
        if cls.family in POLYMORPHIC_FAMILIES:
            if self.type is None:
                object.__setattr__(self, "type", cls.type_key)
            elif cls.type_key is not None and self.type != cls.type_key:
                raise ParamsError(
                    f"{cls.type_key}.type is {self.type!r} but this class is registered as {cls.type_key!r}; "
                    f"leave `type` unset or use the params class registered under {self.type!r}."
                )
        hints = _type_hints(cls)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check(value, hints[f.name], f"{self.gin_name}.{f.name}")
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses extend it and raise ``ParamsError``."""

    @property
    def gin_name(self) -> str:
        return type(self).type_key or type(self).__name__

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` applied (validation runs again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __hash__(self) -> int:  # params hold tuples/dicts; hash their JSON so they can be jit-static
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, BaseParams):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def register_params(key: str, *, family: str = "model") -> Callable[[type[T]], type[T]]:
    """Make ``cls`` a frozen dataclass, register it under ``key`` and expose it to gin as ``key``."""

    def deco(cls: type[T]) -> type[T]:
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.type_key = key
        cls.family = family
        cls.__hash__ = BaseParams.__hash__  # dataclass(frozen, eq) would replace it with a field-tuple hash
        registry._register(registry.PARAMS, "params type", key, cls)
        gin.configurable(key)(cls)
        return cls

    return deco


def params_from_dict(data: dict[str, Any], cls: type | None = None, *, family: str = "model") -> Any:
    """Rebuild a params object from ``to_dict`` output; ``cls`` defaults to the class of ``data['type']``.

    Unknown keys raise (an old run's JSON with a field we dropped says which one), missing keys take
    the defaults.
    """
    polymorphic = family in POLYMORPHIC_FAMILIES
    if cls is None or (polymorphic and data.get("type") and getattr(cls, "type_key", None) != data["type"]):
        if "type" not in data or data["type"] is None:
            raise ParamsError(f"Cannot rebuild {family} params without a 'type' key: {sorted(data)}")
        cls = registry.params_class(data["type"], family=family)
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamsError(f"{cls.type_key or cls.__name__}: unknown fields {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _from_jsonable(value, hints[name])
    for f in dataclasses.fields(cls):  # absent keys take the class default, never a live gin binding
        if f.name in kwargs:
            continue
        if f.default is not dataclasses.MISSING:
            kwargs[f.name] = f.default
        elif isinstance(f.default_factory, type) and issubclass(f.default_factory, BaseParams):
            kwargs[f.name] = params_from_dict({}, f.default_factory, family=f.default_factory.family)
        elif f.default_factory is not dataclasses.MISSING:
            kwargs[f.name] = f.default_factory()
    return cls(**kwargs)


def _from_jsonable(value: Any, hint: Any) -> Any:
    if isinstance(value, dict):
        member = _params_members(hint)
        if member:
            family = member[0].family
            by_type = "type" in value and family in POLYMORPHIC_FAMILIES
            return params_from_dict(value, None if by_type else member[0], family=family)
    return value


def _params_members(hint: Any) -> list[type]:
    args = typing.get_args(hint) if _is_union(hint) else (hint,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseParams)]


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type):
        return (getattr(hint, "type_key", None) and f"@{hint.type_key}()") or hint.__name__
    return str(hint).replace("typing.", "")


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate ``value`` against ``hint``; return it (possibly coerced) or raise ``ParamsError``."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if _is_union(hint):
        errors = []
        for arg in typing.get_args(hint):
            try:
                return _check(value, arg, where)
            except ParamsError as e:
                errors.append(e)
        raise ParamsError(f"{where}: expected {_describe(hint)}, got {type(value).__name__} {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ParamsError(f"{where}: expected None, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise ParamsError(f"{where}: must be one of {list(choices)}, got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ParamsError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        elem = args[0] if args else Any
        return tuple(_check(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a dict, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ParamsError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
    if hint in (bool, str):
        if isinstance(value, hint):
            return value
        raise ParamsError(f"{where}: expected a {hint.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(hint, type) and issubclass(hint, BaseParams):
        if isinstance(value, hint):
            return value
        raise ParamsError(
            f"{where}: expected {_describe(hint)}, got {type(value).__name__} "
            f"(type {getattr(value, 'type', None)!r}); bind it in gin as `{where} = @{hint.type_key}()`"
        )
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ParamsError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def closest_name(name: str, known: list[str]) -> str:
    """' Did you mean X?' for the nearest of ``known`` to ``name`` (empty when none is near)."""
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
