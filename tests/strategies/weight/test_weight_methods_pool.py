"""The five weight-level methods for real: a pool of two vLLM specialists (spec-reverse, strong
at `reverse`; spec-max) and a scratch deployment; each method runs through the coordinator's
`run_job` on the synthetic `reverse` task, merging the members' safetensors into candidate dirs,
scoring every candidate on dev by hot-swapping it into the scratch (its version grows, the engine
never restarts), and answering test through the scratch with the weights it chose. Candidates
are written in small shards here (`SHARD_BYTES` lowered), so the scratch reloads sharded dirs."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ports import free_port as _free_port

from moco_ray.config import ModelSpec, PoolConfig, TaskSpec
from moco_ray.coordinator import JobRequest, run_job
from moco_ray.records import SamplingParams
from moco_ray.strategies.weight import _merge
from moco_ray.tasks.loaders import load_task

MODELS = ["reverser", "maxer"]
# The scratch shares the members' config: zoo:tiny differs from the specialists in
# `initializer_range`, which the swap validation compares (see the report to the lead).
SCRATCH_PATH = "zoo:spec-reverse"
# Small searches: a few candidates each, CPU-sized.
PARAMS = {
    "weight_greedy_soup": {},
    "weight_dare_ties": {"mode": "optimized", "population": 2, "max_iterations": 2,
                         "density": 0.5},
    "weight_model_swarms": {"max_iterations": 2},
    "weight_lorahub": {"max_inference_step": 4, "lorahub_dev_samples": 8},
    "weight_expo": {"alpha_candidates": [0.1, 0.3]},
}




@pytest.fixture(scope="module")
def wpool(ray_session):
    from moco_ray.pool import ModelPool

    def spec(name: str, path: str, **kw) -> ModelSpec:
        return ModelSpec(name=name, path=path, engine="vllm", dtype="float32", max_model_len=256,
                         num_cpus=0.5, **kw)

    p = ModelPool(PoolConfig(name="weightmethods", http_port=_free_port(), models=[
        spec("reverser", "zoo:spec-reverse"), spec("maxer", "zoo:spec-max"),
        spec("scratch", SCRATCH_PATH, role="scratch")]), seed=0)
    p.start(timeout_s=900)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def task():
    return load_task(TaskSpec(name="reverse", source="synthetic", dev_limit=8, test_limit=8))


def _scratch_version(pool) -> int:
    return pool.handle("scratch").info.remote().result()["version"]


@pytest.mark.parametrize("strategy", list(PARAMS))
def test_weight_method_on_a_real_pool(strategy, wpool, task, tmp_path, monkeypatch):
    monkeypatch.setenv("MOCO_RAY_WORKDIR", str(tmp_path))
    monkeypatch.setattr(_merge, "SHARD_BYTES", 256 << 10)  # the ~1 MB members: 4+ shards
    client = wpool.client()
    before = _scratch_version(wpool)
    req = JobRequest(job=f"w-{strategy}", strategy=strategy,
                     params={**PARAMS[strategy], "temperature": 0.0}, task=task,
                     models=MODELS, scratch="scratch", concurrency=8)
    recs = asyncio.run(run_job(req, client))
    after = _scratch_version(wpool)

    assert len(recs) == 8 and {r.split for r in recs} == {"test"}
    assert all(0.0 <= r.score <= 1.0 for r in recs)
    weights = recs[0].meta["weights"]
    assert all(r.meta["weights"] == weights for r in recs)
    for r in recs:  # every answer came from the scratch, serving the chosen weights
        assert [t.model for t in r.trace] == ["scratch"]
        assert r.trace[0].step == "answer" and r.trace[0].meta["weights"] == weights
        assert r.cost["scratch"].calls == 1
    assert after > before  # candidates were swapped into the running scratch
    assert Path(weights, "config.json").is_file()
    assert list(Path(weights).glob("*.safetensors"))
    # Only the chosen candidate is left of what the job wrote (no swarm state either).
    written = {p.parent for p in tmp_path.rglob("*.safetensors")}
    assert written <= {Path(weights)}
    if written:  # a merged candidate, sharded
        index = Path(weights, _merge.INDEX_FILE)
        assert index.is_file() and len(list(Path(weights).glob("model-*-of-*.safetensors"))) > 3

    meta = recs[0].meta
    if strategy == "weight_greedy_soup":
        # spec-reverse is the best member on `reverse`; averaging it with an unrelated
        # specialist (another random init) ruins it, so the soup stays the member alone, and
        # the scratch must answer exactly as the member itself does.
        assert meta["ingredients"] == ["reverser"], meta
        prompts = [task.prompt(ex) for ex in task.test.examples]
        own = asyncio.run(client.generate("reverser", prompts,
                                          SamplingParams(max_tokens=task.max_tokens,
                                                         temperature=0.0)))
        by_id = {r.example_id: r.output for r in recs}
        assert [by_id[ex.id] for ex in task.test.examples] == [g.text for g in own]
        assert sum(r.score for r in recs) / len(recs) > 0.5
    elif strategy == "weight_expo":
        assert meta["source"] == ["maxer"] and meta["target"] == ["reverser"]
        assert meta["alpha"] in (0.1, 0.3)
    elif strategy == "weight_dare_ties":
        assert sum(meta["merge_weights"].values()) == pytest.approx(1.0)
    elif strategy == "weight_lorahub":
        assert list(meta["coefficients"]) == ["maxer"]  # the base (reverser) is no module
    elif strategy == "weight_model_swarms":
        assert meta["dev_score"] >= max(meta["scores"][0])
