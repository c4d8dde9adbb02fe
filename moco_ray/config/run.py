"""A run: one pool, its tasks, and the jobs (strategy x task) to run over them.

Schemas only. `moco_ray.workflows.load.load_config` parses a YAML file into a `RunConfig` and
checks what a schema can't (model paths, task names, strategies and their parameters).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from moco_ray.config.base import ConfigError, Frozen, fmt_loc
from moco_ray.config.pool import PoolConfig
from moco_ray.config.task import TaskSpec


class JobSpec(Frozen):
    """One strategy with its hyperparameters; it runs on every task of the config."""

    strategy: str
    params: dict[str, Any] = Field(default_factory=dict)
    models: list[str] | None = Field(None, description="subset of the pool (default: all)")
    logit_group: str | None = None
    scratch: str | None = Field(None, description="scratch deployment for weight-level jobs "
                                "(default: the pool's first scratch model)")
    splits: list[Literal["dev", "test"]] = Field(default_factory=lambda: ["test"])
    name: str | None = None


class RunConfig(Frozen):
    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    concurrency: int = Field(16, ge=1, description="examples in flight per job")
    max_jobs: int | None = Field(None, ge=1, description="jobs in flight at once, the next "
                                 "starting when one ends (None: all at once)")
    max_trainings: int | None = Field(
        None, ge=1, description="adapter trainings (Ray Train runs of the methods that learn) at "
        "once across all jobs; the rest wait for a slot (None: no cap). On a CPU node the pool's "
        "engines leave room for few trainers beside them")
    warm_trainers: bool = Field(
        False, description="keep each trainer's Ray Train workers alive between trainings (one "
        "long-lived run per scaling setup, trainings one at a time; see moco_ray.training.warm): "
        "no worker start, imports or handback per training, at the cost of holding the "
        "trainers' resources while idle")
    pool: PoolConfig
    tasks: list[TaskSpec] = Field(min_length=1)
    jobs: list[JobSpec] = Field(min_length=1)


def validate_schema(model: type[Frozen], raw: dict, source: str = "config"):
    """`raw` as `model`, or one ConfigError listing every schema problem by its key."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([f"{fmt_loc(err['loc'])}: {err['msg']}" for err in e.errors()],
                          source) from None


def read_yaml(path: str | Path) -> dict:
    """The mapping at the top of a YAML file, or a ConfigError saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"file not found: {p}"], str(p))
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["top level must be a mapping"], str(p))
    return raw
