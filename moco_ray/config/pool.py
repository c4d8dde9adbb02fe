"""The pool: its models (each a Serve deployment) and logit groups."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from moco_ray.config.base import Frozen
from moco_ray.config.engine import EngineSpec


class ModelSpec(Frozen):
    """One model of the pool: a Serve deployment wrapping one engine."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="unique name in the pool")
    path: str = Field(description="local dir, hub name, or 'zoo:<name>' for a model the zoo makes")
    engine: str = Field("vllm", description="engine kind: 'vllm', 'hf', another registered "
                        "kind, or 'package.module:Class' of an Engine (moco_ray.engines)")
    dtype: str = "auto"
    max_model_len: int = Field(1024, ge=16)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    enable_lora: bool = False
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    weight_sync: str = Field("disk", description="how swapped weights reach the replicas "
                             "(moco_ray.pool.swap.sync): 'disk', a checkpoint dir each "
                             "replica's engine reloads")
    role: Literal["member", "scratch"] = Field(
        "member", description="'member': a model that collaborates; 'scratch': a deployment that "
        "weight-level jobs hot-swap candidate weights into (never a job's collaborator, never "
        "swapped by the evolution loop); it must share the members' architecture")

    def engine_spec(self, resolved_path: str, seed: int = 0) -> EngineSpec:
        return EngineSpec(model=resolved_path, kind=self.engine, dtype=self.dtype,
                          max_model_len=self.max_model_len, seed=seed,
                          enable_lora=self.enable_lora, engine_kwargs=self.engine_kwargs)


class LogitGroupSpec(Frozen):
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


class PoolConfig(Frozen):
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
