"""Training inside a job: the methods that learn (routers, selectors, defer tokens, per-agent
SFT) train LoRA adapters over pool models with the distillation trainer (Ray Train + DeepSpeed),
and then serve them from the live deployments as per-request adapters. The shared pool's weights
never change: a job's adapters are its own, kept under the job's workdir.

    paths = await train_adapters(ctx, {"router": ("m1", rows)}, DistillConfig(max_steps=50))
    gens = await ectx.generate_lora("m1", paths["router"], prompt, params)

Rows are chat SFT rows (see `moco_ray.distill.data`): `{"messages": [...]}` with the loss on the
assistant turns only. Only dev data may reach them; callers build rows inside `fit`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from moco_ray.distill import DistillConfig, DistillJob, distill_all
from moco_ray.records import Cost
from moco_ray.strategies.base import StrategyContext

# A job's adapters are small and train on a few hundred dev rows: LoRA r=8 on every linear layer,
# served as an adapter (never merged: the pool's weights stay as they are).
DEFAULT_ADAPTER = DistillConfig(method="lora", output="adapter", lora_r=8, lora_alpha=16.0,
                                lr=1e-3, batch_size=4, max_steps=60, zero_stage=2,
                                report_every=20, max_seq_len=512)


async def train_adapters(ctx: StrategyContext, jobs: dict[str, tuple[str, list[dict]]],
                         cfg: DistillConfig | None = None) -> dict[str, str]:
    """Train one LoRA adapter per `{name: (pool_model, rows)}` (Ray Train runs with DeepSpeed
    inside; see `run_trainings` for how they share runs), starting from the weights each pool
    model serves now. Returns `{name: adapter_dir}`. Training time is charged to the job's cost as `train:<name>`."""
    cfg = cfg or DEFAULT_ADAPTER
    if cfg.method != "lora" or cfg.output != "adapter":
        raise ValueError("a job trains LoRA adapters served per request (method='lora', "
                         f"output='adapter'), got method={cfg.method!r} output={cfg.output!r}")
    for name, (model, rows) in jobs.items():
        if model not in ctx.models:
            raise ValueError(f"adapter {name!r}: model {model!r} is not one of the job's models "
                             f"{ctx.models}")
        if not rows:
            raise ValueError(f"adapter {name!r}: no training rows (dev gave nothing to learn)")
    root = Path(ctx.workdir) / f"adapters-{time.time_ns()}"
    bases = {name: await ctx.pool.weights_path(model) for name, (model, _) in jobs.items()}
    specs = [DistillJob(name, bases[name], rows, str(root / name))
             for name, (_, rows) in jobs.items()]
    infos = await run_trainings(ctx, specs, lambda part, runs: distill_all(part, cfg, runs))
    return {name: infos[name].path for name in jobs}


# Adapter trainings at once in this process (the coordinator actor, so across all its jobs);
# None: no cap (Ray's resource scheduling alone decides).
_SLOTS: asyncio.Semaphore | None = None
_CAP = 0


def limit_trainings(n: int | None) -> None:
    """Let at most `n` adapter trainings (Ray Train runs) run at once in this process (None lifts
    the cap). A CPU node that holds the pool's engines has room for few trainers beside them."""
    global _SLOTS, _CAP
    if n is not None and n < 1:
        raise ValueError(f"max trainings at once must be >= 1 or None, got {n}")
    _SLOTS, _CAP = (asyncio.Semaphore(n) if n else None), n or 0


async def run_trainings(ctx: StrategyContext, specs: list,
                        train: Callable[[list, int | None], dict]) -> dict:
    """`train(specs, runs) -> {name: info}` off the event loop. Without a cap every spec gets its
    own Ray Train run, all at once (`runs=None`). Under `limit_trainings(n)` the specs are dealt
    into at most n groups; each group waits for a slot and trains its specs one after another
    in ONE run (`runs=1`): a slot held for one run start instead of one per spec. Wall time is
    charged to the job's cost as `train:<name>` (shared evenly by the specs). `spec.model` is
    each spec's name."""
    t0 = time.perf_counter()
    if _SLOTS is None:
        infos = await asyncio.to_thread(train, specs, None)
    else:
        async def one(group: list):
            async with _SLOTS:
                return await asyncio.to_thread(train, group, 1)

        n = min(_CAP, len(specs))
        infos = {k: v for part in await asyncio.gather(*(one(specs[i::n]) for i in range(n)))
                 for k, v in part.items()}
    seconds = time.perf_counter() - t0
    for spec in specs:
        name = f"train:{spec.model}"
        c = Cost(calls=1, engine_seconds=seconds / len(specs))
        ctx.cost[name] = ctx.cost.get(name, Cost()).add(c)
    return infos


def adapter_config(**overrides) -> DistillConfig:
    """DEFAULT_ADAPTER with some fields changed (validated)."""
    return DistillConfig.model_validate({**DEFAULT_ADAPTER.model_dump(), **overrides})

