"""Config schemas (pydantic, frozen): the bottom layer, importing nothing else of moco_ray.

Schemas only; `moco_ray.workflows.load` reads YAML into them and checks cross-references.
"""
from moco_ray.config.base import ConfigError, Frozen, fmt_loc
from moco_ray.config.distill import DistillConfig
from moco_ray.config.engine import EngineSpec
from moco_ray.config.evolve import EvolveConfig
from moco_ray.config.pool import LogitGroupSpec, ModelSpec, PoolConfig
from moco_ray.config.run import JobSpec, RunConfig, read_yaml, validate_schema
from moco_ray.config.task import TaskSpec, default_data_dir

__all__ = ["ConfigError", "DistillConfig", "EngineSpec", "EvolveConfig", "Frozen", "JobSpec",
           "LogitGroupSpec", "ModelSpec", "PoolConfig", "RunConfig", "TaskSpec",
           "default_data_dir", "fmt_loc", "read_yaml", "validate_schema"]
