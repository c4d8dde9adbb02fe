"""moco_ray: model collaboration and the single-multi evolution loop on Ray.

The short public surface; everything else lives in modules a user need not read.

    from moco_ray import load_config, run_config          # strategies x tasks over one pool
    from moco_ray import load_evolve, evolve              # collaborate -> distill -> swap, looped
    from moco_ray import ModelPool, Coordinator           # the pieces, for your own workflows
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Lazy attributes: `import moco_ray` stays cheap (no torch, ray or vllm until used).
_EXPORTS = {
    "load_config": "moco_ray.config", "RunConfig": "moco_ray.config",
    "PoolConfig": "moco_ray.config", "ConfigError": "moco_ray.config",
    "run_config": "moco_ray.sweep",
    "load_evolve": "moco_ray.evolve", "evolve": "moco_ray.evolve",
    "EvolveConfig": "moco_ray.evolve",
    "ModelPool": "moco_ray.pool.pool", "Coordinator": "moco_ray.coordinator",
    "JobRequest": "moco_ray.coordinator",
    "Strategy": "moco_ray.strategies.base", "register": "moco_ray.strategies.base",
    "get_strategy": "moco_ray.strategies.base", "list_strategies": "moco_ray.strategies.base",
    "Engine": "moco_ray.engines.base", "EngineSpec": "moco_ray.engines.base",
    "build_engine": "moco_ray.engines.base",
    "Record": "moco_ray.records", "SamplingParams": "moco_ray.records",
    "Generation": "moco_ray.records",
    "load_task": "moco_ray.tasks.loaders",
    "DistillConfig": "moco_ray.distill.config", "distill_all": "moco_ray.distill.launch",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazy exports above)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moco_ray' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from moco_ray.config import ConfigError, PoolConfig, RunConfig, load_config  # noqa: F401
    from moco_ray.coordinator import Coordinator, JobRequest  # noqa: F401
    from moco_ray.evolve import EvolveConfig, evolve, load_evolve  # noqa: F401
    from moco_ray.pool.pool import ModelPool  # noqa: F401
    from moco_ray.sweep import run_config  # noqa: F401
