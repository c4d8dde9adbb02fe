"""Config files to validated configs: schema first, then every cross-reference a schema can't
check (model paths, task names, strategies and their parameters), all on the driver before any
actor or deployment starts. One `ConfigError` lists every problem by its key.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from moco_ray.config import (
    ConfigError,
    EvolveConfig,
    RunConfig,
    fmt_loc,
    read_yaml,
    validate_schema,
)
from moco_ray.engines.registry import engine_class
from moco_ray.models import check_path
from moco_ray.pool.swap.sync import weight_sync_class
from moco_ray.strategies.registry import get_strategy
from moco_ray.tasks.loaders import known_task


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a config dict: schema, then cross-references (models, tasks, strategies)."""
    cfg = validate_schema(RunConfig, raw, source)
    problems = check_references(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def check_references(cfg: RunConfig) -> list[str]:
    """Every problem a valid schema can still hide: paths, task names, strategies, params."""
    problems: list[str] = []
    names = [m.name for m in cfg.pool.members]
    scratch = [m.name for m in cfg.pool.scratch]
    groups = [g.name for g in cfg.pool.logit_groups]
    for i, m in enumerate(cfg.pool.models):
        err = check_path(m.path)
        if err:
            problems.append(f"pool.models.{i}.path: {err}")
        try:
            weight_sync_class(m.weight_sync)
        except (ValueError, ImportError, AttributeError) as e:
            problems.append(f"pool.models.{i}.weight_sync: {e}")
        try:
            engine_class(m.engine)
        except (ValueError, ImportError, AttributeError) as e:
            problems.append(f"pool.models.{i}.engine: {e}")
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
            problems += [f"jobs.{i}.params.{fmt_loc(err['loc'])}: {err['msg']}"
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
    return parse_config(read_yaml(path), str(path))


def parse_evolve(raw: dict, source: str = "config") -> EvolveConfig:
    cfg = validate_schema(EvolveConfig, raw, source)
    problems = [p.replace("jobs.0.", "system.") for p in check_references(cfg.run_config())]
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_evolve(path: str | Path) -> EvolveConfig:
    return parse_evolve(read_yaml(path), str(path))
