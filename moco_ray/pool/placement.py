"""Where the pool's replicas go: Serve deployment options from the pool's specs, and the devices
of a logit group's members. Pure functions (no Ray calls), so they are tested without GPUs;
`ModelPool.start` deploys with them and `moco-ray plan` places their bundles.

Follows Ray Serve LLM (`LLMConfig.placement_group_config`, `LLMServer.get_deployment_options`):
a model whose vLLM engine runs tensor/pipeline-parallel workers gets `placement_group_bundles`,
Serve starts the replica actor in the first bundle, and vLLM (distributed_executor_backend
'ray') starts one worker in each GPU bundle of the replica's placement group. Departure: Serve
LLM adds the replica actor's resources to the first GPU bundle; here the replica has a bundle
of its own (its CPUs and custom resources), then one {"GPU": 1} bundle per worker, so every
GPU bundle holds exactly one worker. Strategy: STRICT_PACK (one node) when the workers are
tensor-parallel only, PACK (one node if possible) with pipeline stages, which may cross nodes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moco_ray.config import LogitGroupSpec, ModelSpec

# A transformers model in memory takes its weights plus this share for KV cache and
# activations (lockstep decoding, the hf engine); the same factor places a group's members.
HF_MEMORY_FACTOR = 1.2


def replica_bundles(m: ModelSpec) -> list[dict[str, float]] | None:
    """The placement group bundles of one replica, or None when the replica is a plain actor
    (one worker: `num_gpus` on the actor itself)."""
    if m.workers == 1:
        return None
    replica = {"CPU": m.num_cpus, **m.resources}
    return [{k: v for k, v in replica.items() if v > 0}] + [{"GPU": 1.0}] * m.workers


def placement_strategy(m: ModelSpec) -> str | None:
    if m.workers == 1:
        return None
    return "STRICT_PACK" if m.pipeline_parallel_size == 1 else "PACK"


def deployment_options(m: ModelSpec) -> dict[str, Any]:
    """Keyword arguments of `ModelServer.options` for model `m`: replicas (fixed or Serve's
    `autoscaling_config`), the replica actor's resources, and its placement group when vLLM
    runs parallel workers (the actor then holds no GPU: its workers do)."""
    opts: dict[str, Any] = {"max_ongoing_requests": m.max_ongoing_requests}
    a = m.autoscaling
    if a is None:
        opts["num_replicas"] = m.replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "initial_replicas": m.start_replicas}
    bundles = replica_bundles(m)
    opts["ray_actor_options"] = {"num_cpus": m.num_cpus,
                                 "num_gpus": m.num_gpus if bundles is None else 0.0,
                                 "resources": dict(m.resources)}
    if bundles is not None:
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = placement_strategy(m)
    return opts


def group_options(g: LogitGroupSpec) -> dict[str, Any]:
    """Keyword arguments of `LogitGroupServer.options`. A replica is one actor holding all of
    the group's GPUs (Ray gives one actor whole GPUs of one node, as a one-bundle placement
    group would), so it needs no placement group of its own."""
    return {"num_replicas": g.replicas, "max_ongoing_requests": g.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": g.num_cpus, "num_gpus": g.num_gpus,
                                  "resources": dict(g.resources)}}


def replica_resources(m: ModelSpec) -> dict[str, float]:
    """What one replica of `m` takes from the cluster, its placement group included."""
    return {"CPU": m.num_cpus, "GPU": m.gpus_per_replica, **m.resources}


def member_devices(need: Sequence[float], gpu_free: Sequence[float]) -> list[str]:
    """Device of each logit group member, given the bytes each needs (weights x
    HF_MEMORY_FACTOR) and the free bytes of each of the group's GPUs.

    No GPUs: 'cpu'. At least as many GPUs as members: member i on cuda:i. Fewer: first-fit
    decreasing (largest member first, ties in member order) onto the first GPU with room.
    A member that fits no single GPU gets 'auto': transformers' device_map='auto' spreads it
    over the GPUs, loaded after the others so it takes what they leave."""
    if not gpu_free:
        return ["cpu"] * len(need)
    if len(gpu_free) >= len(need):
        return [f"cuda:{i}" if n <= gpu_free[i] else "auto" for i, n in enumerate(need)]
    free = list(gpu_free)
    out = ["auto"] * len(need)
    for i in sorted(range(len(need)), key=lambda i: (-need[i], i)):
        for j, room in enumerate(free):
            if need[i] <= room:
                out[i], free[j] = f"cuda:{j}", room - need[i]
                break
    return out
