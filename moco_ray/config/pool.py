"""The pool: its models (each a Serve deployment) and logit groups."""
from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

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


API_KEY_ENV = "MOCO_RAY_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine. Any name but 'localhost' counts as not
    loopback: it may resolve to a public address, so it must not skip the key."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PoolConfig(Frozen):
    name: str = Field("moco", pattern=r"^[A-Za-z0-9_-]+$", description="Serve app prefix")
    models: list[ModelSpec] = Field(min_length=1)
    logit_groups: list[LogitGroupSpec] = Field(default_factory=list)
    http_port: int = Field(8000, ge=0, le=65535)
    http_host: str = Field(
        "127.0.0.1", min_length=1, description="address Serve's HTTP proxy listens on; any "
        "address but loopback (127.0.0.1, ::1, localhost) needs an API key")
    # Excluded from dumps: the key never lands in a saved config.yaml, a job fingerprint or a
    # log. A run resumed from its saved config therefore takes the key from the env var.
    api_key: SecretStr | None = Field(
        None, exclude=True, description="key HTTP clients must send as 'Authorization: Bearer "
        f"<key>'; unset: the env var {API_KEY_ENV}, if set; neither: no key is asked for "
        "(allowed on a loopback http_host only)")
    max_prompts_per_request: int = Field(
        128, ge=1, description="most prompts one /v1/completions request may carry (a list "
        "prompt is one engine batch); more are refused with a 400")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="largest max_tokens an HTTP request may ask for; unset: each "
        "model's max_model_len (which also caps a larger value here)")
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="seconds an HTTP generation may take before it is cancelled "
        "and answered with a 504; unset: no limit")

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

    @model_validator(mode="after")
    def _key_off_loopback(self) -> PoolConfig:
        # Anyone who can reach a non-loopback address could otherwise use the models for free.
        if not is_loopback(self.http_host) and self.resolved_api_key() is None:
            raise ValueError(f"http_host {self.http_host!r} is not loopback, so the HTTP routes "
                             f"need an API key: set the env var {API_KEY_ENV} (or api_key in "
                             "the pool config), or serve on http_host 127.0.0.1")
        return self

    def resolved_api_key(self) -> str | None:
        """The key clients must send: the config's, else the env var's (empty counts as unset);
        read when called, so a pool started later sees the env it starts in."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None

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
