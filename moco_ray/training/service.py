"""The trainer a job's strategies reach through `ctx.trainer`: the methods that learn (routers,
selectors, defer tokens, per-agent SFT, Sparta's DPO, AggLM's GRPO) train LoRA adapters over
pool models with this layer's trainers (Ray Train + DeepSpeed), then serve them from the live
deployments as per-request adapters. The shared pool's weights never change: a job's adapters
are its own, kept under the job's workdir.

The coordinator makes one `TrainerService` per actor and hands it to every job's context, so the
cap on trainings at once (`max_trainings`) holds across all of its jobs. Strategies never import
this module (the layer contract forbids it); they see the `Trainer` protocol of
`moco_ray.strategies.base`. Nothing here is process-wide: two services keep their own caps and
their own warm trainers.
"""
from __future__ import annotations

import asyncio
import atexit
import time
from collections.abc import Callable
from pathlib import Path

from moco_ray.config.distill import DEFAULT_ADAPTER, DistillConfig, GRPOSettings, on_gpu_pool
from moco_ray.records import Cost
from moco_ray.training.launch import DistillJob, distill_all
from moco_ray.training.preference import PreferenceJob, dpo_train_adapters, grpo_train_adapter
from moco_ray.training.warm import WarmTrainers


class TrainerService:
    """Adapter training for the jobs of one process. `max_trainings`: Ray Train runs at once
    across all jobs (None: no cap, Ray's resource scheduling alone decides). `warm`: train on
    warm trainers of this service's own (`moco_ray.training.warm`: one long-lived Ray Train run
    per scaling setup, stopped by `close` or at exit). `on_gpu`: the pool runs on GPUs
    (`PoolConfig.on_gpus`), so every training defaults to one GPU per worker, bf16 and NCCL
    (`on_gpu_pool`; a config that sets use_gpu or bf16 keeps its own)."""

    def __init__(self, max_trainings: int | None = None, warm: bool = False,
                 on_gpu: bool = False):
        if max_trainings is not None and max_trainings < 1:
            raise ValueError(f"max trainings at once must be >= 1 or None, got {max_trainings}")
        self._cap = max_trainings or 0
        self._slots = asyncio.Semaphore(max_trainings) if max_trainings else None
        self._warm = WarmTrainers() if warm else None
        self._on_gpu = on_gpu
        if self._warm is not None:
            atexit.register(self._warm.close)

    def close(self) -> None:
        """Stop this service's warm trainers (if any)."""
        if self._warm is not None:
            self._warm.close()
            atexit.unregister(self._warm.close)

    def placed(self, cfg: DistillConfig) -> DistillConfig:
        """`cfg` as this service trains it: with the GPU defaults when the pool is on GPUs."""
        return on_gpu_pool(cfg) if self._on_gpu else cfg

    async def train_adapters(self, ctx, jobs: dict[str, tuple[str, list[dict]]],
                             cfg: DistillConfig | None = None) -> dict[str, str]:
        """Train one LoRA SFT adapter per `{name: (pool_model, rows)}`, starting from the weights
        each pool model serves now. Returns `{name: adapter_dir}`."""
        cfg = self.placed(cfg or DEFAULT_ADAPTER)
        if cfg.method != "lora" or cfg.output != "adapter":
            raise ValueError("a job trains LoRA adapters served per request (method='lora', "
                             f"output='adapter'), got method={cfg.method!r} "
                             f"output={cfg.output!r}")
        for name, (model, rows) in jobs.items():
            if model not in ctx.models:
                raise ValueError(f"adapter {name!r}: model {model!r} is not one of the job's "
                                 f"models {ctx.models}")
            if not rows:
                raise ValueError(f"adapter {name!r}: no training rows (dev gave nothing to learn)")
        root = Path(ctx.workdir) / f"adapters-{time.time_ns()}"
        bases = {name: await ctx.pool.weights_path(model) for name, (model, _) in jobs.items()}
        specs = [DistillJob(name, bases[name], rows, str(root / name))
                 for name, (_, rows) in jobs.items()]
        infos = await self.run_trainings(
            ctx, specs, lambda part, runs: distill_all(part, cfg, runs, self._warm))
        return {name: infos[name].path for name in jobs}

    async def train_dpo(self, ctx, jobs: dict[str, tuple[str, list[dict], str | None]],
                        cfg: DistillConfig, beta: float) -> dict[str, str]:
        """DPO-train one adapter per `{name: (pool_model, pairs, init_adapter)}`, from the
        weights each pool model serves now. Returns `{name: adapter_dir}`."""
        root = Path(ctx.workdir) / f"dpo-{time.time_ns()}"
        cfg = self.placed(cfg)
        specs = [PreferenceJob(name, await ctx.pool.weights_path(model), pairs, str(root / name),
                               init)
                 for name, (model, pairs, init) in jobs.items()]
        infos = await self.run_trainings(
            ctx, specs, lambda part, runs: dpo_train_adapters(part, cfg, beta, runs, self._warm))
        return {name: infos[name].path for name in jobs}

    async def train_grpo(self, ctx, name: str, model: str, rows: list[dict], reward,
                         cfg: DistillConfig, settings: GRPOSettings) -> str:
        """GRPO-train one adapter of pool model `model` from the weights it serves now, with the
        picklable `reward(completion, row) -> float`. Returns the adapter dir."""
        out = Path(ctx.workdir) / f"grpo-{time.time_ns()}" / name
        cfg = self.placed(cfg)
        base = await ctx.pool.weights_path(model)
        infos = await self.run_trainings(ctx, [PreferenceJob(name, base, rows, str(out))],
                                         lambda *_: {name: grpo_train_adapter(
                                             name, base, rows, reward, str(out), cfg, settings,
                                             warm=self._warm)})
        return infos[name].path

    async def run_trainings(self, ctx, specs: list,
                            train: Callable[[list, int | None], dict]) -> dict:
        """`train(specs, runs) -> {name: info}` off the event loop. Without a cap every spec
        gets its own Ray Train run, all at once (`runs=None`). Under a cap of n the specs are
        dealt into at most n groups; each group waits for a slot and trains its specs one after
        another in ONE run (`runs=1`): a slot held for one run start instead of one per spec.
        Wall time is charged to the job's cost as `train:<name>` (shared evenly by the specs).
        `spec.model` is each spec's name."""
        t0 = time.perf_counter()
        if self._slots is None:
            infos = await asyncio.to_thread(train, specs, None)
        else:
            async def one(group: list):
                async with self._slots:
                    return await asyncio.to_thread(train, group, 1)

            n = min(self._cap, len(specs))
            infos = {k: v for part in await asyncio.gather(*(one(specs[i::n]) for i in range(n)))
                     for k, v in part.items()}
        seconds = time.perf_counter() - t0
        for spec in specs:
            name = f"train:{spec.model}"
            c = Cost(calls=1, engine_seconds=seconds / len(specs))
            ctx.cost[name] = ctx.cost.get(name, Cost()).add(c)
        return infos
