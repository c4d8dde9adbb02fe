"""A Serve replica killed mid-sweep (`ray.kill` of its actor): the calls in flight on it are
sent again to a live replica, every call returns, and the answers are those of a run without
the kill (greedy decoding of a fixed model: a call is a pure function of its arguments)."""
from __future__ import annotations

import asyncio

import pytest
import ray
from ports import free_port

from moco_ray.config import ModelSpec, PoolConfig
from moco_ray.records import SamplingParams

PROMPTS = [f"Count from {i} to {i + 9}:" for i in range(48)]
GREEDY = SamplingParams(max_tokens=48, temperature=0.0)


@pytest.fixture(scope="module")
def two_replicas(ray_session):
    from moco_ray.pool import ModelPool

    cfg = PoolConfig(name="faulttest", http_port=free_port(), models=[
        ModelSpec(name="m", path="zoo:tiny-s2", engine="hf", dtype="float32", max_model_len=256,
                  num_cpus=0.5, replicas=2, max_ongoing_requests=16)])
    p = ModelPool(cfg, seed=0).start(timeout_s=600)
    yield p
    p.shutdown()


def _replica_actors(app: str) -> list:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::")
            and f"{app}#" in a["name"]]


async def _one_by_one(client, prompts) -> list[str]:
    """Each prompt as its own call, all in flight together (as a job's examples are)."""
    gens = await asyncio.gather(*(client.generate("m", [p], GREEDY) for p in prompts))
    return [g[0].text for g in gens]


def test_calls_in_flight_on_a_killed_replica_finish_on_a_live_one(two_replicas):
    client = two_replicas.client()
    clean = asyncio.run(_one_by_one(client, PROMPTS))
    [app] = [two_replicas.app_name("m")]
    victims = _replica_actors(app)
    assert len(victims) == 2

    async def with_a_kill():
        calls = asyncio.ensure_future(_one_by_one(client, PROMPTS))
        await asyncio.sleep(0.5)  # both replicas are busy with their share by now
        ray.kill(ray.get_actor(victims[0]["name"], namespace="serve"), no_restart=True)
        return await calls

    killed = asyncio.run(with_a_kill())
    assert killed == clean  # nothing lost, nothing changed, one answer per call
    assert client.retries >= 1  # some calls did hit the dead replica and were sent again
    # Serve replaces the dead replica; the pool keeps serving.
    assert asyncio.run(_one_by_one(client, PROMPTS[:4])) == clean[:4]
