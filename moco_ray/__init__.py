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
    # configs and their loading (checked whole on the driver before anything starts)
    "load_config": "moco_ray.workflows.load", "load_evolve": "moco_ray.workflows.load",
    "ConfigError": "moco_ray.config", "RunConfig": "moco_ray.config",
    "PoolConfig": "moco_ray.config", "EvolveConfig": "moco_ray.config",
    "DistillConfig": "moco_ray.config",
    # workflows
    "run_config": "moco_ray.workflows.sweep", "evolve": "moco_ray.workflows.evolve.loop",
    "write_report": "moco_ray.workflows.report",
    # the pieces, for your own workflows
    "ModelPool": "moco_ray.pool.pool", "Coordinator": "moco_ray.coordinator",
    "JobRequest": "moco_ray.coordinator", "TrainerService": "moco_ray.training.service",
    "distill_all": "moco_ray.training.launch",
    # extension points
    "Strategy": "moco_ray.strategies.base", "Answer": "moco_ray.strategies.base",
    "register": "moco_ray.strategies.base", "get_strategy": "moco_ray.strategies.registry",
    "list_strategies": "moco_ray.strategies.registry",
    "Engine": "moco_ray.engines.base", "EngineSpec": "moco_ray.config",
    "build_engine": "moco_ray.engines.registry", "register_engine": "moco_ray.engines.registry",
    "load_task": "moco_ray.tasks.loaders",
    # typed records
    "Record": "moco_ray.records", "SamplingParams": "moco_ray.records",
    "Generation": "moco_ray.records",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazy exports above)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moco_ray' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from moco_ray.config import (  # noqa: F401
        ConfigError,
        DistillConfig,
        EngineSpec,
        EvolveConfig,
        PoolConfig,
        RunConfig,
    )
    from moco_ray.coordinator import Coordinator, JobRequest  # noqa: F401
    from moco_ray.engines.base import Engine  # noqa: F401
    from moco_ray.engines.registry import build_engine, register_engine  # noqa: F401
    from moco_ray.pool.pool import ModelPool  # noqa: F401
    from moco_ray.records import Generation, Record, SamplingParams  # noqa: F401
    from moco_ray.strategies.base import Answer, Strategy, register  # noqa: F401
    from moco_ray.strategies.registry import get_strategy, list_strategies  # noqa: F401
    from moco_ray.tasks.loaders import load_task  # noqa: F401
    from moco_ray.training.launch import distill_all  # noqa: F401
    from moco_ray.training.service import TrainerService  # noqa: F401
    from moco_ray.workflows.evolve.loop import evolve  # noqa: F401
    from moco_ray.workflows.load import load_config, load_evolve  # noqa: F401
    from moco_ray.workflows.report import write_report  # noqa: F401
    from moco_ray.workflows.sweep import run_config  # noqa: F401
