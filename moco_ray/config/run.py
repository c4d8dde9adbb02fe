"""A run: one pool, its tasks, and the jobs (strategy x task) to run over them.

Schemas only. `moco_ray.workflows.load.load_config` parses a YAML file into a `RunConfig` and
checks what a schema can't (model paths, task names, strategies and their parameters).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

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


STORAGE_HELP = ("root every file of the run derives from (<storage>/<run_name>/: records, saved "
                "jobs, scratch/ for what jobs write, train/ for Ray Train); on a multi-node cluster "
                "a path every node sees (NFS, EFS, Lustre, a FUSE-mounted bucket). `output_dir` "
                "is its deprecated name")

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class HasStorage(Frozen):
    """The `storage` checks a run config and an evolve config share: `output_dir` is accepted as
    its deprecated name (both with different values is an error), and an object-store URI is
    refused (engines load weights from local dirs, so only a shared filesystem path works)."""

    @model_validator(mode="before")
    @classmethod
    def _output_dir_alias(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "output_dir" not in data:
            return data
        data = dict(data)
        old = data.pop("output_dir")
        if "storage" in data and data["storage"] != old:
            raise ValueError(f"output_dir ({old!r}) and storage ({data['storage']!r}) differ; "
                             "give storage only (output_dir is its deprecated name)")
        warnings.warn("config key output_dir is deprecated; call it storage",
                      FutureWarning, stacklevel=2)
        data["storage"] = old
        return data

    @field_validator("storage", check_fields=False)
    @classmethod
    def _shared_path(cls, v: str) -> str:
        if _URI.match(v):
            raise ValueError(
                f"{v!r} is a URI; only a shared filesystem path is supported now (engines load "
                "weights from local dirs): mount the bucket or share (s3fs, gcsfuse, NFS) on "
                "every node and give the mount path")
        return v


class RunConfig(HasStorage):
    run_name: str = "run"
    storage: str = Field("runs", min_length=1, description=STORAGE_HELP)
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
        # A check of the whole mapping (e.g. storage vs output_dir) has no key to name.
        raise ConfigError([f"{fmt_loc(err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
                           for err in e.errors()], source) from None


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
