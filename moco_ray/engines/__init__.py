"""Model backends behind one async protocol (`Engine`): `VLLMEngine` and `HFEngine`.

Import an engine module directly or use `build_engine(spec)`; both are imported lazily because
vLLM and transformers take seconds to import.
"""
from moco_ray.engines.base import Engine, EngineSpec, build_engine

__all__ = ["Engine", "EngineSpec", "build_engine"]
