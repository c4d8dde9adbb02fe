"""The zoo's registry: `zoo:<name>` -> a recipe that builds the model once into
`<cache>/zoo/<name>`.

Recipes register with `register` / `register_family`. Built-in ones live beside this module;
recipes that need a higher layer (the SmolLM2 fine-tunes train with `moco_ray.training`) or
another package are declared under the entry point group `moco_ray.zoo` in its pyproject.toml,
and imported on the first lookup, so the zoo never imports the layers above it.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from filelock import FileLock

from moco_ray.memory import release_memory
from moco_ray.models.cache import cache_dir

PLUGIN_GROUP = "moco_ray.zoo"
_PLUGINS_LOADED = False


def zoo_dir() -> Path:
    return cache_dir() / "zoo"


Builder = Callable[[Path], object]  # builds a model into the given (empty) directory
_RECIPES: dict[str, Builder] = {}
_FAMILIES: dict[str, tuple[re.Pattern, Callable[[re.Match, Path], object]]] = {}


def register(name: str, build: Builder) -> None:
    """Register `zoo:<name>`; `build(out_dir)` writes config, weights and tokenizer."""
    if name in _RECIPES:
        raise ValueError(f"zoo recipe {name!r} is already registered")
    _RECIPES[name] = build


def register_family(pattern: str, build: Callable[[re.Match, Path], object]) -> None:
    """Register a family of names matching `pattern` (full match), e.g. r"tiny-s(\\d+)";
    `build(match, out_dir)` gets the regex match."""
    if pattern in _FAMILIES:
        raise ValueError(f"zoo family {pattern!r} is already registered")
    _FAMILIES[pattern] = (re.compile(pattern), build)


def recipe_names() -> list[str]:
    """Valid names: exact recipes, then family patterns."""
    _load_plugins()
    return sorted(_RECIPES) + [f"/{p}/" for p in _FAMILIES]


def _load_plugins() -> None:
    """Import the modules other packages (or moco_ray's upper layers) declare under the entry
    point group `moco_ray.zoo`; they register their recipes on import. Once per process."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()


def lookup(name: str) -> Builder | None:
    """The builder of `zoo:<name>`, or None."""
    _load_plugins()
    if name in _RECIPES:
        return _RECIPES[name]
    for rx, build in _FAMILIES.values():
        m = rx.fullmatch(name)
        if m:
            return lambda out, m=m, build=build: build(m, out)
    return None


def build(name: str, builder: Builder | None = None) -> Path:
    """Build `<zoo>/<name>` once. Concurrent callers (processes or threads) serialise on a file
    lock; the model is built in a temp dir and renamed into place, so no reader sees half a
    model."""
    builder = builder or lookup(name)
    if builder is None:
        raise KeyError(f"unknown zoo recipe {name!r}; valid: {recipe_names()}")
    root = zoo_dir()
    final = root / name
    if final.exists():  # only ever appears whole (atomic rename below)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if final.exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            builder(tmp)
            # mkdtemp (and safetensors) make files private; other users' workers read them too.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644 if f.is_file() else 0o755)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
            # A trained recipe (the SmolLM2 fine-tunes) leaves its model and optimizer freed but
            # held by the heap of this process, often the driver beside the pool's engines.
            release_memory()
    return final
