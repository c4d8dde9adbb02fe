"""Model backends behind one async protocol (`Engine`): `VLLMEngine` (vllm.py), `HFEngine`
(hf.py), and the lockstep decoder of logit groups (lockstep.py).

`build_engine(spec)` picks the class by `spec.kind` (registry.py); engine modules are imported
lazily because vLLM and transformers take seconds to import.
"""
from moco_ray.config.engine import EngineSpec
from moco_ray.engines.base import Engine
from moco_ray.engines.registry import build_engine, engine_kinds, register_engine

__all__ = ["Engine", "EngineSpec", "build_engine", "engine_kinds", "register_engine"]
