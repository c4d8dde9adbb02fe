"""The pool: its models (each a Serve deployment) and logit groups."""
from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from moco_ray.config.base import CustomResources, Frozen
from moco_ray.config.engine import EngineSpec

# vLLM engine arguments the pool places GPUs by: they are ModelSpec fields, never engine_kwargs.
PLACEMENT_KWARGS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
                    "max_loras", "distributed_executor_backend")


class Autoscaling(Frozen):
    """Serve autoscaling of one model's deployment (its `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=1, description="replicas Serve keeps at the least (and "
                              "starts with, unless the model's `replicas` says otherwise)")
    max_replicas: int = Field(ge=1, description="replicas Serve may scale up to under load")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="requests in flight per replica Serve aims for (Serve's "
        "default); an engine that batches well can take more, e.g. half max_ongoing_requests")

    @model_validator(mode="after")
    def _range(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below min_replicas="
                             f"{self.min_replicas}; fix: max_replicas >= min_replicas")
        return self


def _whole_gpus(num_gpus: float) -> str | None:
    if num_gpus > 1 and num_gpus != int(num_gpus):
        return (f"num_gpus={num_gpus:g}: Ray gives more than one GPU in whole GPUs only; "
                f"fix: {int(num_gpus)} or {int(num_gpus) + 1}")
    return None


class ModelSpec(Frozen):
    """One model of the pool: a Serve deployment wrapping one engine.

    GPU placement (as Ray Serve LLM's LLMConfig): with tensor_parallel_size x
    pipeline_parallel_size = 1 a replica is one actor with `num_gpus` (a fraction shares a GPU);
    above 1 vLLM runs that many workers, one GPU each, in the replica's placement group
    (`moco_ray.pool.placement`), and `num_gpus` must be 1: the GPUs of one worker.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="unique name in the pool")
    path: str = Field(description="local dir, hub name, or 'zoo:<name>' for a model the zoo makes")
    engine: str = Field("vllm", description="engine kind: 'vllm', 'hf', another registered "
                        "kind, or 'package.module:Class' of an Engine (moco_ray.engines)")
    dtype: str = "auto"
    max_model_len: int = Field(1024, ge=16)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: CustomResources = Field(
        default_factory=dict, description="custom Ray resources each replica reserves (e.g. "
        "{node_a: 1} places replicas on nodes started with that resource)")
    replicas: int = Field(1, ge=1, description="replicas (with autoscaling: the ones it starts "
                          "with, within [min_replicas, max_replicas]; default min_replicas)")
    autoscaling: Autoscaling | None = Field(
        None, description="let Serve scale the replicas between min and max by load")

    @model_validator(mode="before")
    @classmethod
    def _start_at_min(cls, data: Any) -> Any:
        # With autoscaling and no `replicas`, start at min_replicas. Filled in here rather than
        # read from model_fields_set, so a dumped config (a saved run) validates the same again.
        if isinstance(data, dict) and data.get("autoscaling") and "replicas" not in data:
            a = data["autoscaling"]
            start = a.get("min_replicas", 1) if isinstance(a, dict) else a.min_replicas
            data = {**data, "replicas": start}
        return data
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs each layer is split over")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: pipeline stages (layers "
                                        "split over GPUs, across nodes if need be)")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM on GPU: share of each of its GPUs' memory the engine "
        "takes for weights, activations and KV cache (engines sharing a GPU must sum to <= 1)")
    max_loras: int = Field(1, ge=1, description="vLLM: LoRA adapters one batch may mix "
                           "(enable_lora only)")
    params_b: float | None = Field(
        None, gt=0, description="parameters in billions, for `moco-ray plan` when the model's "
        "config.json is not on this machine (a hub model not yet in the cache)")
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

    @model_validator(mode="after")
    def _placement(self) -> ModelSpec:
        problems = []
        clash = [k for k in PLACEMENT_KWARGS if k in self.engine_kwargs]
        if clash:
            problems.append(f"engine_kwargs {clash} place the model's GPUs: set them as the "
                            "model's own fields (distributed_executor_backend is the pool's)")
        workers = self.workers
        if workers > 1:
            if self.engine == "hf":
                problems.append(f"tensor_parallel_size x pipeline_parallel_size = {workers} "
                                "needs an engine that runs parallel workers; the hf engine runs "
                                "one process: use engine: vllm")
            if self.num_gpus != 1:
                problems.append(
                    f"tensor_parallel_size x pipeline_parallel_size = {workers} runs {workers} "
                    f"vLLM workers on one GPU each: set num_gpus: 1 (the GPUs of one worker; "
                    f"the replica holds {workers}), got num_gpus={self.num_gpus:g}")
            if self.num_cpus == 0 and not any(v > 0 for v in self.resources.values()):
                problems.append("num_cpus=0 leaves the replica's own bundle of its placement "
                                "group empty, and Ray refuses an empty bundle; fix: num_cpus: 1")
        elif self.num_gpus > 1 and self.engine in ("vllm", "hf"):
            problems.append(f"num_gpus={self.num_gpus:g}: the {self.engine} engine uses one GPU "
                            "per replica; to split the model over GPUs set num_gpus: 1 and "
                            "tensor_parallel_size (engine: vllm)")
        whole = _whole_gpus(self.num_gpus)
        if whole:
            problems.append(whole)
        a = self.autoscaling
        if a is not None and not (
                a.min_replicas <= self.replicas <= a.max_replicas):
            problems.append(f"replicas={self.replicas} conflicts with autoscaling [min_replicas="
                            f"{a.min_replicas}, max_replicas={a.max_replicas}]: with autoscaling "
                            "`replicas` is the count it starts with; fix: a value in that range, "
                            "or drop replicas")
        if self.max_loras > 1 and not self.enable_lora:
            problems.append(f"max_loras={self.max_loras} without enable_lora: true serves no "
                            "adapter; set enable_lora: true or drop max_loras")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def workers(self) -> int:
        """GPU workers of one replica: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def gpus_per_replica(self) -> float:
        return self.num_gpus if self.workers == 1 else float(self.workers)

    @property
    def start_replicas(self) -> int:
        """Replicas at start: `replicas`, or with autoscaling min_replicas unless `replicas`
        is set."""
        return self.replicas

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def engine_spec(self, resolved_path: str, seed: int = 0) -> EngineSpec:
        return EngineSpec(model=resolved_path, kind=self.engine, dtype=self.dtype,
                          max_model_len=self.max_model_len, seed=seed,
                          enable_lora=self.enable_lora, engine_kwargs=self.engine_kwargs,
                          gpu_memory_utilization=self.gpu_memory_utilization,
                          tensor_parallel_size=self.tensor_parallel_size,
                          pipeline_parallel_size=self.pipeline_parallel_size,
                          max_loras=self.max_loras,
                          # Workers as Ray actors in the replica's placement group (vLLM's
                          # default, 'mp', would start them as processes outside Ray's view).
                          distributed_executor_backend="ray" if self.workers > 1 else None)


class LogitGroupSpec(Frozen):
    """Several pool models co-located in one deployment, decoded in lockstep (logit level).

    A replica is one actor holding `num_gpus` GPUs (whole ones above 1, on one node): member i
    on cuda:i when there are as many GPUs as members, else packed by size, and a member that
    fits no single GPU spread over them (`moco_ray.pool.placement.member_devices`).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    models: list[str] = Field(min_length=2, description="names of pool models; same tokenizer")
    dtype: str = "float32"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: CustomResources = Field(
        default_factory=dict, description="custom Ray resources the group's replica reserves")
    replicas: int = Field(1, ge=1, description="replicas of the group, each holding every member")
    max_ongoing_requests: int = Field(
        128, ge=1, description="calls the group's replica takes at once; concurrent calls with "
        "the same settings decode as one batch, so this bounds the batch (Serve's default, 5, "
        "would cut every batch to 5 calls)")

    @model_validator(mode="after")
    def _gpus(self) -> LogitGroupSpec:
        whole = _whole_gpus(self.num_gpus)
        if whole:
            raise ValueError(whole)
        return self


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
    def on_gpus(self) -> bool:
        """Whether the pool runs on GPUs: any of its models (members or scratch) has num_gpus
        > 0. Trainings beside such a pool default to GPUs, bf16 and NCCL."""
        return any(m.num_gpus > 0 for m in self.models)

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
