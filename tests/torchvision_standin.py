"""Import a package whose import pulls torchvision (no working CPU build here) with inert stand-ins for the
torchvision modules in ``sys.modules`` during the import only (open_clip and timm: their model code never uses
torchvision; their data transforms and a few unused layers do)."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import pytest

TORCHVISION_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.datasets",
)


class _AnyAttr(type):
    """A stand-in class whose every attribute is another stand-in class (``InterpolationMode.BICUBIC`` ...)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttr(name, (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _AnyAttr(name, (), {})
        setattr(self, name, value)
        return value


def import_without_torchvision(package: str, install_hint: str) -> Any:
    """``import package`` with torchvision stood in; skips the test (saying how to install) when it is absent."""
    if package in sys.modules:
        return sys.modules[package]
    pytest.importorskip("transformers")  # imported first: it probes torchvision's spec, which a stand-in lacks
    saved = {name: sys.modules.get(name) for name in TORCHVISION_MODULES}
    try:
        for name in TORCHVISION_MODULES:
            sys.modules[name] = _StandInModule(name)
            if "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(sys.modules[parent], child, sys.modules[name])
        try:
            return importlib.import_module(package)
        except ImportError as e:
            pytest.skip(f"{package} is not installed ({e}); {install_hint}")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
