"""Strategies by name: every built-in method, plus those registered with `register` or named
"package.module:Class".

Built-in strategies live in single.py and <level>/<method>.py; they are all imported on first
lookup, so a Ray actor finds every strategy without depending on imports the driver ran.
"""
from __future__ import annotations

import importlib
import pkgutil

from moco_ray.plugins import load_object
from moco_ray.strategies.base import _REGISTRY, Strategy

_LEVEL_PACKAGES = ("api", "text", "logit", "weight")


def _load_builtins() -> None:
    importlib.import_module("moco_ray.strategies.single")
    for level in _LEVEL_PACKAGES:
        pkg = importlib.import_module(f"moco_ray.strategies.{level}")
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def get_strategy(name: str) -> type[Strategy]:
    """Look a strategy up by registered name or by 'package.module:Class'."""
    if ":" in name:
        cls = load_object(name)
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"{name!r} is not a Strategy subclass")
        return cls
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid: {', '.join(sorted(_REGISTRY))}") from None


def list_strategies() -> dict[str, type[Strategy]]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))
