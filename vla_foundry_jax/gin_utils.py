"""Gin front end: parse ``--gin_file`` / ``--gin_bindings``, build the experiment, write the operative config.

Every params class is a gin configurable under its type key (``transformer.n_layers = 12``,
``experiment.model = @transformer()``); see ``vla_foundry_jax.params.base.register_params``.

``parse_gin`` fails before anything runs, with a ``GinConfigError`` that names the problem and the fix, for:
a gin file that cannot be found (the search paths tried are listed), an unknown configurable or field (with
the closest registered name), a malformed binding (shown), a literal of the wrong type for its field, a
params reference of the wrong kind (``vlm.vit = @transformer()``) or without ``()``, an undefined macro,
and a macro that nothing uses (usually a typo such as ``transformer_n_layers = 3``). Cross-field errors
(``n_heads`` not dividing ``hidden_dim``) surface as ``ParamsError`` from ``build_experiment``.

Gin file names are tried as given (relative to the working directory), then under each search path: the
ones passed in, the directories of the gin files given, the repository root and its ``gin_configs/``
directory. So ``quickstart.gin`` and ``gin_configs/quickstart.gin`` both work, and ``include`` lines
inside gin files resolve the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import tokenize
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gin
from absl import logging

from vla_foundry_jax import registry
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params import base
from vla_foundry_jax.params.base import BaseParams, ParamsError, closest_name
from vla_foundry_jax.params.train_params import TrainExperimentParams

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_CONFIGS_DIR = REPO_ROOT / "gin_configs"

_BINDING_HELP = (
    "A binding reads `configurable.field = value` (scoped: `scope/configurable.field = value`); the value is a "
    "Python literal, `@type_key()` for a nested params object, or `%MACRO`."
)


class GinConfigError(VLAFoundryError, ValueError):
    """A gin file or binding that cannot be used; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Public API


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Clear the gin config, parse ``gin_files`` in order, then ``gin_bindings`` (which override the files).

    Validates every binding against the registered params classes and finalizes (locks) the config.
    Raises ``GinConfigError`` for anything that cannot be used.
    """
    import vla_foundry_jax  # noqa: F401  (registers every configurable)

    gin.clear_config()
    base_prefixes = _search_prefixes(search_paths)
    paths = [(name, _find_gin_file(name, base_prefixes)) for name in gin_files]
    # Includes resolve like gin files, and also next to the top-level gin files.
    prefixes = _search_prefixes([*search_paths, *(os.path.dirname(path) for _, path in paths)])
    saved = list(gin.config._LOCATION_PREFIXES)
    saved_readers = list(gin.config._FILE_READERS)
    gin.config._LOCATION_PREFIXES[:] = prefixes
    gin.config._FILE_READERS[:] = [_quiet(entry) for entry in saved_readers]
    try:
        for name, path in paths:
            _parse(lambda path=path: gin.parse_config_file(path), where=f"gin file {name!r}", prefixes=prefixes)
        for binding in gin_bindings:
            _parse(lambda b=binding: gin.parse_config(b), where=f"--gin_bindings={binding!r}", prefixes=prefixes)
        _validate_config()
        _parse(gin.finalize, where="the parsed config", prefixes=prefixes)
    except BaseException:
        gin.clear_config()
        raise
    finally:
        gin.config._LOCATION_PREFIXES[:] = saved
        gin.config._FILE_READERS[:] = saved_readers


def build_experiment() -> TrainExperimentParams:
    """``TrainExperimentParams()`` filled by the parsed gin config (call ``parse_gin`` first).

    Bindings that no constructed params object used (e.g. ``vit.n_layers`` when the model uses
    ``vit_backbone``) are logged as a warning.
    """
    experiment = TrainExperimentParams()
    unused = unused_bindings()
    if unused:
        logging.warning(
            "gin bindings never used (no params object of that type/scope was built): %s", "; ".join(unused)
        )
    return experiment


def operative_config_str() -> str:
    """The gin config to save as ``<output_dir>/config.gin``: every value the built params used.

    Gin records only configurables that were called, so call it after ``build_experiment``. Bindings that
    were parsed but never used are appended as comments. Before anything was built, the parsed config is
    returned instead.
    """
    operative = gin.operative_config_str()
    if not gin.config._OPERATIVE_CONFIG:
        return "# Nothing was built from this config yet; these are the parsed bindings.\n" + gin.config_str()
    unused = unused_bindings()
    if unused:
        operative += "\n# Parsed but never used:\n" + "".join(f"#   {b}\n" for b in unused)
    return operative


def unused_bindings() -> list[str]:
    """Bindings (``scope/configurable.field = value``) of configurables never called in a matching scope."""
    called = list(gin.config._OPERATIVE_CONFIG)
    unused = []
    for (scope, selector), args in gin.config._CONFIG.items():
        if selector.startswith("gin."):
            continue
        used = any(sel == selector and (not scope or s == scope or s.startswith(scope + "/")) for s, sel in called)
        if not used:
            unused += [f"{_key(scope, selector, arg)} = {value!r}" for arg, value in args.items()]
    return unused


# ----------------------------------------------------------------------------------------------------------
# Search paths


def _search_prefixes(search_paths: Sequence[str]) -> list[str]:
    """'' (as given: absolute, or relative to the working directory), ``search_paths``, gin_configs/, the repo."""
    prefixes = ["", *(os.path.expanduser(p) for p in search_paths), str(GIN_CONFIGS_DIR), str(REPO_ROOT)]
    return list(dict.fromkeys(prefixes))


def _quiet(entry: tuple[Callable, Callable]) -> tuple[Callable, Callable]:
    """gin's Python-package reader (``gin.resource_reader``) logs ``E ... Path not found: x.gin`` for every search
    prefix where a file is not a package resource, i.e. on every normal include. Its existence check is replaced
    during parsing by the same check without the log lines; package-resource includes
    (``include 'some.package/x.gin'``) still resolve."""
    reader, exists = entry
    if getattr(exists, "__module__", None) != "gin.resource_reader":
        return entry

    def quiet_exists(config_path: str) -> bool:
        head, filename = os.path.split(config_path)
        try:
            spec = importlib.util.find_spec(head.replace("/", "."))
        except (ImportError, ValueError):  # not a package path (gin logs an error here)
            return False
        if spec is None or not spec.origin:
            return False
        return os.path.isfile(os.path.join(os.path.dirname(spec.origin), filename))

    return reader, quiet_exists


def _find_gin_file(name: str, prefixes: list[str]) -> str:
    name = os.path.expanduser(name)
    tried = _candidates(name, prefixes)
    for path in tried:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise GinConfigError(_missing_file_message(name, tried, prefixes))


def _candidates(name: str, prefixes: list[str]) -> list[str]:
    if os.path.isabs(name):
        return [name]
    return list(dict.fromkeys(os.path.abspath(os.path.join(p, name)) for p in prefixes))


def _missing_file_message(name: str, tried: list[str], prefixes: list[str]) -> str:
    known = sorted({p.name for d in prefixes if d and os.path.isdir(d) for p in Path(d).glob("*.gin")})
    searched = "\n".join(f"  {t}" for t in tried)
    return (
        f"gin file {name!r} not found. Tried:\n{searched}\n"
        f"Fix the name or add its directory with --gin_search_paths.{closest_name(Path(name).name, known)}"
        + (f" Gin files on the search paths: {', '.join(known)}." if known else "")
    )


# ----------------------------------------------------------------------------------------------------------
# Turning gin's exceptions into messages that say what to do

_RE_UNKNOWN_REF = re.compile(r"No configurable matching reference '@([^']*?)(\(\))?'\.")
_RE_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching '([^']*)'\.")
_RE_UNKNOWN_PARAM = re.compile(r"Configurable '([^']*)' doesn't have a parameter named '([^']*)'\.")
_RE_MISSING_FILE = re.compile(r"Unable to open file: (.*?)\. Searched config paths: ")


def _parse(fn: Callable[[], Any], *, where: str, prefixes: list[str]) -> None:
    try:
        fn()
    except (GinConfigError, ParamsError):
        raise
    except SyntaxError as e:
        raise GinConfigError(_syntax_message(e, where)) from None
    except tokenize.TokenError as e:
        raise GinConfigError(
            f"malformed gin binding in {where}: {e.args[0]} (an unclosed bracket or string?). {_BINDING_HELP}"
        ) from None
    except (ValueError, OSError, ImportError) as e:
        raise GinConfigError(_value_message(str(e), where, prefixes)) from None


def _syntax_message(e: SyntaxError, where: str) -> str:
    msg = e.args[0] if e.args else str(e)
    loc = e.args[1] if len(e.args) > 1 else None
    if isinstance(loc, tuple) and len(loc) == 4:
        filename, line_num, char_num, line = loc
        place = f"{filename} line {line_num}" if filename else f"{where}, line {line_num}"
        caret = " " * (char_num or 0) + "^"
        return f"malformed gin binding in {place}: {msg}\n    {(line or '').rstrip()}\n    {caret}\n{_BINDING_HELP}"
    return f"malformed gin binding in {where}: {msg}. {_BINDING_HELP}"


def _value_message(text: str, where: str, prefixes: list[str]) -> str:
    first, _, location = text.partition("\n")
    location = ("\n" + location) if location else ""
    if m := _RE_MISSING_FILE.match(first):
        name = m.group(1)
        tried = _candidates(name, prefixes)
        return f"{_missing_file_message(name, tried, prefixes)} (included from {where}){location}"
    if m := _RE_UNKNOWN_REF.match(first):
        name = m.group(1).rsplit("/", 1)[-1]
        return (
            f"unknown gin configurable '@{name}{m.group(2) or ''}' in {where}.{closest_name(name, _known_names())} "
            f"Registered: {', '.join(_known_names())}.{location}"
        )
    if m := _RE_UNKNOWN_CONFIGURABLE.match(first):
        name = m.group(1)
        return (
            f"unknown gin configurable {name!r} in {where}.{closest_name(name, _known_names())} "
            f"Registered: {', '.join(_known_names())}.{location}"
        )
    if m := _RE_UNKNOWN_PARAM.match(first):
        return _unknown_field_message(m.group(1), m.group(2), where) + location
    return f"gin config error in {where}: {text}"


def _known_names() -> list[str]:
    names = {sel.rsplit(".", 1)[-1] for sel, _ in gin.config._REGISTRY.items() if not sel.startswith("gin.")}
    return sorted(names | set(registry.PARAMS))


def _configurable_target(selector: str) -> Any:
    try:
        configurable = gin.config._REGISTRY.get_match(selector)
    except KeyError:
        return None
    return configurable.wrapped if configurable is not None else None


def _is_params_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseParams) and dataclasses.is_dataclass(obj)


def _field_names(target: Any) -> list[str]:
    if _is_params_class(target):
        return [f.name for f in dataclasses.fields(target) if f.init]
    try:
        return [p for p in inspect.signature(target).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


def _unknown_field_message(selector: str, field: str, where: str) -> str:
    target = _configurable_target(selector)
    name = selector.rsplit(".", 1)[-1]
    fields = _field_names(target)
    if isinstance(getattr(target, field, None), property):
        hint = f" {name}.{field} is derived, not a field" + (
            " (read from the Hugging Face config named by `hf_pretrained`)." if "hf_pretrained" in fields else "."
        )
    else:
        hint = closest_name(field, fields)
    return f"{name} has no field {field!r} (in {where}).{hint} Fields of {name}: {', '.join(sorted(fields))}."


# ----------------------------------------------------------------------------------------------------------
# Checks gin does not make at parse time


def _key(scope: str, selector: str, arg: str) -> str:
    name = selector.rsplit(".", 1)[-1]
    return f"{scope + '/' if scope else ''}{name}.{arg}"


def _references(value: Any) -> Iterator[Any]:
    if isinstance(value, gin.config.ConfigurableReference):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _references(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _references(v)


def _is_macro(ref: Any) -> bool:
    return ref.configurable.wrapped is gin.config.macro


def _validate_config() -> None:
    """Check every parsed binding of a params class: field exists, literal type fits, references fit."""
    config = gin.config._CONFIG
    macros = {scope: args.get("value") for (scope, sel), args in config.items() if sel == "gin.macro"}
    used_macros: set[str] = set()
    for (scope, selector), args in config.items():
        for arg, value in args.items():
            where = f"`{_key(scope, selector, arg)} = {value!r}`" if selector != "gin.macro" else f"`{scope} = ...`"
            for ref in _references(value):
                if _is_macro(ref):
                    name = "/".join(ref.scopes)
                    used_macros.add(name)
                    if name not in macros:
                        raise GinConfigError(
                            f"macro %{name} used in {where} is never defined; add a line `{name} = value`."
                            f"{closest_name(name, list(macros))}"
                        )
    for name in macros:
        if name not in used_macros:
            candidates = [f"{k}.{f}" for k, c in registry.PARAMS.items() for f in _field_names(c)]
            guess = closest_name(name.replace("/", "."), candidates)
            raise GinConfigError(
                f"`{name} = {macros[name]!r}` defines a gin macro that no binding uses (%{name}), so it sets "
                f"nothing.{guess} {_BINDING_HELP}"
            )
    for (scope, selector), args in config.items():
        target = _configurable_target(selector)
        if not _is_params_class(target):
            continue
        hints = typing.get_type_hints(target)
        fields = _field_names(target)
        for arg, value in args.items():
            where = f"binding `{_key(scope, selector, arg)} = {value!r}`"
            if arg not in fields:
                raise GinConfigError(_unknown_field_message(selector, arg, where))
            _check_value(_resolve_macros(value, macros), hints[arg], _key(scope, selector, arg), where)


def _resolve_macros(value: Any, macros: dict[str, Any]) -> Any:
    for _ in range(16):  # macros may name macros
        if isinstance(value, gin.config.ConfigurableReference) and _is_macro(value):
            value = macros.get("/".join(value.scopes))
        else:
            break
    return value


def _accepted_params(hint: Any) -> list[type]:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return [a for a in args if _is_params_class(a)]


def _check_value(value: Any, hint: Any, key: str, where: str) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
        target = value.configurable.wrapped
        if not _is_params_class(target):
            return  # a function's result: only known when called
        name = value.selector.rsplit(".", 1)[-1]
        if not value.evaluate:
            raise GinConfigError(
                f"{where} passes the class itself; write `@{value.scoped_selector}()` (with parentheses) so gin "
                f"builds a {name} params object."
            )
        accepted = _accepted_params(hint)
        if hint is Any or any(issubclass(target, a) for a in accepted):
            return
        options = sorted(k for k, c in registry.PARAMS.items() if any(issubclass(c, a) for a in accepted))
        takes = ", ".join(f"@{k}()" for k in options) if options else base._describe(hint)
        raise GinConfigError(f"{where}: {key} takes {takes}, not @{name}().")
    if any(True for _ in _references(value)):
        return  # references nested in a literal: checked when built
    try:
        base._check(value, hint, key)
    except ParamsError as e:
        raise GinConfigError(f"{e} (in {where})") from None
