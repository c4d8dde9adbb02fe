"""Run configuration (pydantic, frozen), validated whole on the driver before anything starts.

`load_config(path)` parses the YAML, checks every model path, task name and strategy (with its
hyperparameters) and raises one `ConfigError` that lists every problem by its key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moco_ray.engines.base import EngineSpec


class ConfigError(ValueError):
    """A config with problems; the message lists each one with the key it sits under."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Frozen):
    """One model of the pool: a Serve deployment wrapping one engine."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="unique name in the pool")
    path: str = Field(description="local dir, hub name, or 'zoo:<name>' for a model the zoo makes")
    engine: Literal["vllm", "hf"] = "vllm"
    dtype: str = "auto"
    max_model_len: int = Field(1024, ge=16)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    enable_lora: bool = False
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    role: Literal["member", "scratch"] = Field(
        "member", description="'member': a model that collaborates; 'scratch': a deployment that "
        "weight-level jobs hot-swap candidate weights into (never a job's collaborator, never "
        "swapped by the evolution loop); it must share the members' architecture")

    def engine_spec(self, resolved_path: str, seed: int = 0) -> EngineSpec:
        return EngineSpec(model=resolved_path, kind=self.engine, dtype=self.dtype,
                          max_model_len=self.max_model_len, seed=seed,
                          enable_lora=self.enable_lora, engine_kwargs=self.engine_kwargs)


class LogitGroupSpec(_Frozen):
    """Several pool models co-located in one deployment, decoded in lockstep (logit level)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    models: list[str] = Field(min_length=2, description="names of pool models; same tokenizer")
    dtype: str = "float32"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(
        128, ge=1, description="calls the group's replica takes at once; concurrent calls with "
        "the same settings decode as one batch, so this bounds the batch (Serve's default, 5, "
        "would cut every batch to 5 calls)")


class PoolConfig(_Frozen):
    name: str = Field("moco", pattern=r"^[A-Za-z0-9_-]+$", description="Serve app prefix")
    models: list[ModelSpec] = Field(min_length=1)
    logit_groups: list[LogitGroupSpec] = Field(default_factory=list)
    http_port: int = Field(8000, ge=0, le=65535)

    @model_validator(mode="after")
    def _names(self) -> PoolConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names {dup}")
        for g in self.logit_groups:
            missing = [m for m in g.models if m not in names]
            if missing:
                raise ValueError(f"logit group {g.name!r} names unknown models {missing}; "
                                 f"pool models: {names}")
        return self

    @property
    def members(self) -> list[ModelSpec]:
        """The collaborating models (scratch deployments excluded)."""
        return [m for m in self.models if m.role == "member"]

    @property
    def scratch(self) -> list[ModelSpec]:
        return [m for m in self.models if m.role == "scratch"]

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in the pool; models: {[m.name for m in self.models]}")


class TaskSpec(_Frozen):
    """A task by name: a MoCo task file, a JSONL file, a hub dataset, or a synthetic task."""

    name: str
    source: Literal["moco", "jsonl", "hf", "synthetic"] = "moco"
    path: str | None = Field(None, description="file/dir for moco and jsonl; dataset for hf")
    kind: str | None = Field(None, description="metric kind for jsonl/hf tasks")
    dev_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class JobSpec(_Frozen):
    """One strategy with its hyperparameters; it runs on every task of the config."""

    strategy: str
    params: dict[str, Any] = Field(default_factory=dict)
    models: list[str] | None = Field(None, description="subset of the pool (default: all)")
    logit_group: str | None = None
    scratch: str | None = Field(None, description="scratch deployment for weight-level jobs "
                                "(default: the pool's first scratch model)")
    splits: list[Literal["dev", "test"]] = Field(default_factory=lambda: ["test"])
    name: str | None = None


class RunConfig(_Frozen):
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
        "long-lived run per scaling setup, trainings one at a time; see moco_ray.distill.warm): "
        "no worker start, imports or handback per training, at the cost of holding the "
        "trainers' resources while idle")
    pool: PoolConfig
    tasks: list[TaskSpec] = Field(min_length=1)
    jobs: list[JobSpec] = Field(min_length=1)


def default_data_dir() -> Path:
    """Where MoCo task files live: $MOCO_RAY_DATA, else ../shared/data/moco beside the repo."""
    env = os.environ.get("MOCO_RAY_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "moco"


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a config dict: schema, then cross-references (models, tasks, strategies)."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([f"{_fmt_loc(err['loc'])}: {err['msg']}" for err in e.errors()],
                          source) from None
    problems = check_references(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def check_references(cfg: RunConfig) -> list[str]:
    """Every problem a valid schema can still hide: paths, task names, strategies, params."""
    from moco_ray import zoo
    from moco_ray.strategies.base import get_strategy
    from moco_ray.tasks.loaders import known_task

    problems: list[str] = []
    names = [m.name for m in cfg.pool.members]
    scratch = [m.name for m in cfg.pool.scratch]
    groups = [g.name for g in cfg.pool.logit_groups]
    for i, m in enumerate(cfg.pool.models):
        err = zoo.check_path(m.path)
        if err:
            problems.append(f"pool.models.{i}.path: {err}")
    if not names:
        problems.append("pool.models: every model has role 'scratch'; at least one must be a "
                        "member (role: member, the default)")
    for i, g in enumerate(cfg.pool.logit_groups):
        bad = [m for m in g.models if m in scratch]
        if bad:
            problems.append(f"pool.logit_groups.{i}.models: {bad} are scratch deployments, "
                            "not members; a logit group holds members only")
    for i, t in enumerate(cfg.tasks):
        err = known_task(t)
        if err:
            problems.append(f"tasks.{i}.name: {err}")
    for i, j in enumerate(cfg.jobs):
        try:
            cls = get_strategy(j.strategy)
        except (KeyError, ImportError, AttributeError, TypeError) as e:
            problems.append(f"jobs.{i}.strategy: {e.args[0] if e.args else e}")
            continue
        try:
            cls.Params.model_validate(j.params)
        except ValidationError as e:
            problems += [f"jobs.{i}.params.{_fmt_loc(err['loc'])}: {err['msg']}"
                         for err in e.errors()]
        for m in j.models or []:
            if m not in names:
                problems.append(f"jobs.{i}.models: unknown model {m!r}; pool models: {names}")
        if cls.level == "logit" and not (j.logit_group or groups):
            problems.append(f"jobs.{i}.logit_group: {j.strategy} needs a logit group "
                            "(pool.logit_groups is empty)")
        if j.logit_group and j.logit_group not in groups:
            problems.append(f"jobs.{i}.logit_group: unknown group {j.logit_group!r}; "
                            f"groups: {groups}")
        if j.scratch and j.scratch not in scratch:
            problems.append(f"jobs.{i}.scratch: {j.scratch!r} is not a scratch model of the "
                            f"pool; scratch models: {scratch} (pool.models[*].role: scratch)")
        if getattr(cls, "needs_scratch", False) and not (j.scratch or scratch):
            problems.append(f"jobs.{i}.scratch: {j.strategy} scores merged weights in a scratch "
                            "deployment; add a pool model with role: scratch (same "
                            "architecture as the members)")
    return problems


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"file not found: {p}"], str(p))
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["top level must be a mapping"], str(p))
    return parse_config(raw, str(p))
