"""A strategy through the Serve pool + coordinator actor, against the same calls made on the
engines directly in this process. Same strategy code, same engines, same examples: the ratio is
the cost of the distributed path (Serve handles, the coordinator actor, record streaming).

    .venv/bin/python benchmarks/pool_overhead.py [--strategy text_majority_vote] [--n 48]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time

from moco_ray import models
from moco_ray.config import ModelSpec, PoolConfig
from moco_ray.coordinator import JobRequest, run_job
from moco_ray.engines.registry import build_engine
from moco_ray.tasks.synthetic import make_synthetic

MODELS = [ModelSpec(name="reverser", path="zoo:spec-reverse", engine="vllm", dtype="float32",
                    max_model_len=256, num_cpus=0.5),
          ModelSpec(name="maxer", path="zoo:spec-max", engine="vllm", dtype="float32",
                    max_model_len=256, num_cpus=0.5),
          ModelSpec(name="sorter", path="zoo:spec-sort", engine="hf", dtype="float32",
                    max_model_len=256, num_cpus=0.5)]


class DirectClient:
    """PoolClient over engines in this process (no Ray): the baseline."""

    def __init__(self, engines: dict):
        self.engines = engines
        self.models = list(engines)

    async def generate(self, model, prompts, params, lora=None):
        gens = await self.engines[model].generate(prompts, params)
        return [g.model_copy(update={"model": model}) for g in gens]

    async def score(self, model, prompt, continuations):
        return await self.engines[model].score(prompt, continuations)

    async def fused_generate(self, group, prompts, params, mode, weights):
        raise NotImplementedError("the direct baseline runs text/API-level strategies")

    def render(self, model, prompt):
        return self.engines[model].render(prompt)


def request(strategy: str, n: int) -> JobRequest:
    task = make_synthetic("max", n_dev=8, n_test=n)
    return JobRequest(job="bench", strategy=strategy, params={"temperature": 0.0},
                      task=task, models=[m.name for m in MODELS], concurrency=32)


async def direct(req: JobRequest) -> float:
    engines = {m.name: build_engine(m.engine_spec(models.resolve_path(m.path))) for m in MODELS}
    try:
        for e in engines.values():
            if hasattr(e, "start"):
                await e.start()
        client = DirectClient(engines)
        await run_job(req.model_copy(update={"job": "warm"}), client)  # warm-up, untimed
        t0 = time.perf_counter()
        recs = await run_job(req, client)
        assert len(recs) == len(req.task.test)
        return time.perf_counter() - t0
    finally:
        for e in engines.values():
            await e.shutdown()


def pooled(req: JobRequest) -> float:
    import ray

    from moco_ray.coordinator import Coordinator
    from moco_ray.pool.pool import ModelPool
    from moco_ray.workflows.runtime import init_ray
    from moco_ray.workflows.sweep import run_jobs

    init_ray()
    cfg = PoolConfig(name="bench", models=MODELS, logit_groups=[], http_port=0)
    with ModelPool(cfg) as pool:
        coord = Coordinator.remote(pool.client())
        run_jobs(coord, [req.model_copy(update={"job": "warm"})])  # warm-up, untimed
        t0 = time.perf_counter()
        recs, _ = run_jobs(coord, [req])
        assert len(recs) == len(req.task.test)
        seconds = time.perf_counter() - t0
        ray.kill(coord)
    ray.shutdown()
    return seconds


if __name__ == "__main__":  # vLLM spawns its engine core: this guard is required
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="text_majority_vote")
    parser.add_argument("--n", type=int, default=48, help="test examples")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    req = request(args.strategy, args.n)
    t_direct = asyncio.run(direct(req))
    t_pool = pooled(req)
    print(f"\n{args.strategy} on {args.n} examples, 3 models (2 vLLM, 1 HF), warm engines")
    print(f"{'engines in-process':<26}{t_direct:>8.2f} s")
    print(f"{'Serve pool + coordinator':<26}{t_pool:>8.2f} s")
    print(f"{'ratio pool / direct':<26}{t_pool / t_direct:>8.2f}")
