"""Engine kinds by name: `build_engine(spec)` makes the engine `spec.kind` names.

The built-in kinds ('vllm', 'hf') are imported on first use: vLLM and transformers take seconds
to import. `register_engine` adds a kind (a class taking an `EngineSpec`); `build_engine` also
takes an engine class directly, so a test or a user can hand in their own.
"""
from __future__ import annotations

from moco_ray.config.engine import EngineSpec
from moco_ray.engines.base import Engine
from moco_ray.plugins import load_object

# kind -> engine class, or "module:Class" for the built-ins (imported when first built).
_KINDS: dict[str, type | str] = {"vllm": "moco_ray.engines.vllm:VLLMEngine",
                                 "hf": "moco_ray.engines.hf:HFEngine"}


def register_engine(kind: str, cls: type) -> None:
    """Make `kind` build `cls(spec)`; a kind already taken is an error."""
    if kind in _KINDS:
        raise ValueError(f"engine kind {kind!r} is already registered ({_KINDS[kind]})")
    _KINDS[kind] = cls


def engine_kinds() -> list[str]:
    return sorted(_KINDS)


def engine_class(kind: str) -> type:
    """The class of a registered kind, or of 'package.module:Class'."""
    if ":" in kind and kind not in _KINDS:
        return load_object(kind)
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {kind!r}; valid: {engine_kinds()}") from None
    if isinstance(cls, str):  # a built-in, imported on first use (vLLM is heavy)
        cls = _KINDS[kind] = load_object(cls)
    return cls


def build_engine(spec: EngineSpec, engine_cls: type | None = None) -> Engine:
    """The engine `spec.kind` names, or `engine_cls(spec)` when a class is given."""
    return (engine_cls or engine_class(spec.kind))(spec)
