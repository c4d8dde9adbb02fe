"""GPU placement of the pool without GPUs: the Serve options and placement bundles a spec turns
into, a logit group's member devices (pure logic), and the start-up resource check on the
session's real Ray (8 CPUs, no GPU)."""
from __future__ import annotations

import pytest

from moco_ray.config import ConfigError, LogitGroupSpec, ModelSpec, PoolConfig
from moco_ray.pool import ModelPool
from moco_ray.pool.placement import (
    deployment_options,
    group_options,
    member_devices,
    replica_bundles,
    replica_resources,
)


def spec(**kw) -> ModelSpec:
    return ModelSpec(name="m", path="org/model", **kw)


def test_one_worker_replica_is_a_plain_actor_with_its_gpus():
    opts = deployment_options(spec(num_gpus=0.5, num_cpus=2, replicas=3, resources={"a": 1},
                                   max_ongoing_requests=9))
    assert opts == {"num_replicas": 3, "max_ongoing_requests": 9,
                    "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5, "resources": {"a": 1}}}
    assert replica_bundles(spec(num_gpus=1)) is None


def test_tensor_parallel_replica_gets_a_strict_pack_placement_group():
    m = spec(num_gpus=1, num_cpus=4, tensor_parallel_size=4, resources={"a": 1})
    opts = deployment_options(m)
    # The replica actor sits in bundle 0 with its CPUs and holds no GPU: vLLM's 4 workers do.
    assert opts["placement_group_bundles"] == [{"CPU": 4, "a": 1}] + [{"GPU": 1.0}] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0.0, "resources": {"a": 1}}
    assert replica_resources(m) == {"CPU": 4, "GPU": 4.0, "a": 1}
    engine = m.engine_spec("/models/m")
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size,
            engine.distributed_executor_backend) == (4, 1, "ray")
    assert spec(num_gpus=1).engine_spec("/x").distributed_executor_backend is None


def test_pipeline_stages_may_cross_nodes_so_they_pack():
    m = spec(num_gpus=1, tensor_parallel_size=2, pipeline_parallel_size=3)
    opts = deployment_options(m)
    assert len(opts["placement_group_bundles"]) == 1 + 6
    assert opts["placement_group_strategy"] == "PACK"


def test_autoscaling_replaces_num_replicas():
    a = {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 16}
    opts = deployment_options(spec(autoscaling=a))
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {**a, "initial_replicas": 2}
    m = spec(autoscaling=a, replicas=4)  # replicas within the range: the count it starts with
    assert deployment_options(m)["autoscaling_config"]["initial_replicas"] == 4
    assert (m.start_replicas, m.max_replicas) == (4, 5)


def test_logit_group_options():
    g = LogitGroupSpec(name="g", models=["a", "b"], num_gpus=2, num_cpus=3, replicas=2)
    assert group_options(g) == {"num_replicas": 2, "max_ongoing_requests": 128,
                                "ray_actor_options": {"num_cpus": 3, "num_gpus": 2,
                                                      "resources": {}}}


@pytest.mark.parametrize("need, free, want", [
    ([5, 5, 5], [], ["cpu", "cpu", "cpu"]),
    # as many GPUs as members: member i on cuda:i, even where packing would share a GPU
    ([5, 5, 5], [40, 40, 40, 40], ["cuda:0", "cuda:1", "cuda:2"]),
    # one too big for its own GPU: spread by device_map='auto'
    ([50, 5], [40, 40], ["auto", "cuda:1"]),
    # fewer GPUs: largest first onto the first GPU with room
    ([10, 30, 20], [40, 40], ["cuda:0", "cuda:0", "cuda:1"]),
    ([17, 17, 17], [40], ["cuda:0", "cuda:0", "auto"]),
    ([10, 10, 10], [40], ["cuda:0", "cuda:0", "cuda:0"]),
])
def test_member_devices(need, free, want):
    assert member_devices(need, free) == want


def test_gpu_settings_are_checked_with_the_fix():
    with pytest.raises(ValueError) as e:
        ModelSpec(name="m", path="org/m", engine="hf", tensor_parallel_size=2, num_gpus=2,
                  engine_kwargs={"gpu_memory_utilization": 0.5})
    msg = str(e.value)
    assert "use engine: vllm" in msg and "set num_gpus: 1" in msg
    assert "engine_kwargs ['gpu_memory_utilization']" in msg
    with pytest.raises(ValueError, match="whole GPUs only"):
        LogitGroupSpec(name="g", models=["a", "b"], num_gpus=1.5)
    with pytest.raises(ValueError, match="uses one GPU per replica"):
        spec(num_gpus=2)
    with pytest.raises(ValueError, match="conflicts with autoscaling"):
        spec(replicas=7, autoscaling={"min_replicas": 1, "max_replicas": 3})
    with pytest.raises(ValueError, match="max_replicas=1 is below min_replicas=2"):
        spec(autoscaling={"min_replicas": 2, "max_replicas": 1})
    with pytest.raises(ValueError, match="Ray refuses an empty bundle"):
        spec(num_gpus=1, num_cpus=0, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="without enable_lora"):
        spec(max_loras=4)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        spec(gpu_memory_utilization=1.5)


def test_resource_check_counts_parallel_gpus_and_min_replicas(ray_session):
    cfg = PoolConfig(name="gpucheck", models=[
        ModelSpec(name="big", path="zoo:tiny", num_gpus=1, num_cpus=1, tensor_parallel_size=2,
                  autoscaling={"min_replicas": 2, "max_replicas": 3}),
        ModelSpec(name="cpu", path="zoo:tiny", num_cpus=1,
                  autoscaling={"min_replicas": 3, "max_replicas": 20})])
    with pytest.raises(ConfigError) as e:
        ModelPool(cfg).validate()
    [problem] = e.value.problems  # 5 CPUs at start fit the session's 8; max (23) is no problem
    assert "pool needs 4 GPU (autoscaling to max_replicas: 6)" in problem
    assert "the Ray cluster has 0" in problem


def test_serve_takes_the_options_as_built():
    """Serve checks deployment options when they are set (no cluster needed): every key and
    value built here is one Serve knows, and the replica fits its first bundle."""
    from moco_ray.pool.logit_group import LogitGroupServer
    from moco_ray.pool.server import ModelServer

    m = spec(num_gpus=1, num_cpus=2, tensor_parallel_size=2, pipeline_parallel_size=2,
             autoscaling={"min_replicas": 1, "max_replicas": 3})
    dep = ModelServer.options(**deployment_options(m))
    assert dep._deployment_config.autoscaling_config.max_replicas == 3
    assert dep._replica_config.placement_group_bundles[1:] == [{"GPU": 1.0}] * 4
    assert dep._replica_config.placement_group_strategy == "PACK"
    g = LogitGroupSpec(name="g", models=["a", "b"], num_gpus=2, replicas=2)
    assert LogitGroupServer.options(**group_options(g)).num_replicas == 2
