"""Custom Ray resources (placement on chosen nodes): the config fields, the pool's start-up check,
and the trainers' resources. Placement itself on a real multi-node cluster: tests/cluster/."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from moco_ray.config import ConfigError, DistillConfig, LogitGroupSpec, ModelSpec, PoolConfig
from moco_ray.pool import ModelPool
from moco_ray.training.launch import Planned, pack
from moco_ray.training.runs import make_trainer

TINY = {"path": "zoo:tiny", "engine": "hf", "num_cpus": 0.5}


@pytest.mark.parametrize("bad, says", [({"CPU": 1}, "num_cpus"), ({"GPU": 1}, "num_gpus"),
                                       ({"node_a": -1}, "greater than or equal to 0")])
def test_resources_take_custom_non_negative_amounts_only(bad, says):
    for make in (lambda: ModelSpec(name="m", **TINY, resources=bad),
                 lambda: LogitGroupSpec(name="g", models=["m", "n"], resources=bad),
                 lambda: DistillConfig(resources_per_worker=bad)):
        with pytest.raises(ValidationError, match=says):
            make()


def test_pool_check_names_a_custom_resource_the_cluster_lacks(ray_session):
    cfg = PoolConfig(name="res", models=[
        ModelSpec(name="m", **TINY, replicas=2, resources={"node_x": 1}),
        ModelSpec(name="n", **TINY, resources={"node_x": 0.5, "node_y": 2})],
        logit_groups=[LogitGroupSpec(name="g", models=["m", "n"], resources={"node_y": 1})])
    with pytest.raises(ConfigError) as e:
        ModelPool(cfg).validate()
    # Replicas and groups add up: 2 x 1 + 0.5 of node_x, 2 + 1 of node_y.
    assert "2.5 of the custom resource 'node_x'" in str(e.value)
    assert "3 of the custom resource 'node_y'" in str(e.value)
    assert "CPU" not in str(e.value)  # 1.5 CPUs fit in the session's Ray
    have = ray_session.cluster_resources()
    fits = PoolConfig(name="res", models=[ModelSpec(name="m", **TINY, resources={
        r: v for r, v in have.items() if r.startswith("node:")})])
    ModelPool(fits).validate()  # a resource the cluster has passes


def test_trainer_workers_reserve_the_custom_resources_and_runs_keep_them_apart(tmp_path):
    cfg = DistillConfig(cpus_per_worker=0.5, resources_per_worker={"trainers": 1})
    trainer = make_trainer(lambda config: None, {}, cfg, "t", str(tmp_path))
    assert trainer.scaling_config.resources_per_worker == {"CPU": 0.5, "trainers": 1}
    # Models whose workers need other resources never share a run (one worker group each).
    planned = [Planned(SimpleNamespace(model=m), c, {}) for m, c in (
        ("a", cfg), ("b", DistillConfig(cpus_per_worker=0.5)), ("c", cfg))]
    assert [[p.job.model for p in run] for run in pack(planned, 1)] == [["a", "c"], ["b"]]
