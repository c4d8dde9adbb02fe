"""The coordinator: a Ray actor that runs strategy x task jobs over one pool, many at once.

Jobs share the pool's engines: their requests interleave on the same deployments, where the
engines batch them (vLLM continuous batching; the HF engine's micro-batcher). Records stream out
as examples finish (`poll`), and each job keeps its cost per model (prompt and completion tokens,
engine seconds, calls), fit included.
"""
from __future__ import annotations

import asyncio
import time
import traceback
from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field

from moco_ray.memory import release_memory
from moco_ray.records import Cost, Record
from moco_ray.strategies.base import PoolClient, StrategyContext, Trainer
from moco_ray.strategies.registry import get_strategy
from moco_ray.tasks.base import Task
from moco_ray.training.service import TrainerService


class JobRequest(BaseModel):
    """One job: a strategy with params on one task, over some models of the pool."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    job: str
    strategy: str
    params: dict = Field(default_factory=dict)
    task: Task
    models: list[str]
    splits: tuple[Literal["dev", "test"], ...] = ("test",)
    logit_group: str | None = None
    scratch: str | None = None
    seed: int = 0
    concurrency: int = 16
    run: str = ""
    generation: int = 0
    skip: frozenset[tuple[str, str]] = Field(
        default_factory=frozenset, description="(split, example id) pairs an earlier run of "
        "this job already recorded: not run again")


class JobStatus(BaseModel):
    job: str
    state: Literal["running", "done", "failed", "cancelled"]
    done: int
    total: int
    error: str | None = None
    cost: dict[str, Cost] = Field(default_factory=dict)
    seconds: float = 0.0


def todo(req: JobRequest, split: str):
    """The examples of `split` that `req` still has to run (all but those in `req.skip`)."""
    part = req.task.split(split)
    if not req.skip:
        return part
    return type(part)(task=part.task,
                      examples=tuple(e for e in part.examples if (split, e.id) not in req.skip))


class _Job:
    def __init__(self, req: JobRequest):
        self.req = req
        self.total = sum(len(todo(req, s)) for s in req.splits)
        self.pending: list[Record] = []
        self.done = 0
        self.state = "running"
        self.error: str | None = None
        self.ctx: StrategyContext | None = None
        self.task: asyncio.Task | None = None
        self.t0 = time.perf_counter()
        self.t1: float | None = None
        self.changed = asyncio.Event()

    def status(self) -> JobStatus:
        end = self.t1 if self.t1 is not None else time.perf_counter()
        return JobStatus(job=self.req.job, state=self.state, done=self.done, total=self.total,
                         error=self.error, cost=dict(self.ctx.cost) if self.ctx else {},
                         seconds=end - self.t0)


async def run_job(req: JobRequest, pool: PoolClient, job: _Job | None = None,
                  trainer: Trainer | None = None) -> list[Record]:
    """Run one job to completion in this event loop (the actor's, or a test's). `trainer`:
    the jobs' shared trainer (default: one of its own, uncapped)."""
    job = job or _Job(req)
    strategy = get_strategy(req.strategy)(req.params)
    ctx = StrategyContext(pool, req.task, req.models, seed=req.seed, logit_group=req.logit_group,
                          scratch=req.scratch, job_id=req.job,
                          trainer=trainer or TrainerService())
    job.ctx = ctx
    await strategy.fit_checked(ctx, req.task.dev)
    out: list[Record] = []
    for split in req.splits:
        async for rec in strategy.run(ctx, todo(req, split), concurrency=req.concurrency):
            rec = rec.model_copy(update={"run": req.run, "generation": req.generation,
                                         "job": req.job})
            out.append(rec)
            job.pending.append(rec)
            job.done += 1
            job.changed.set()
    return out


@ray.remote(num_cpus=0)
class Coordinator:
    """Async actor: `submit` jobs, `poll` their records as they finish, read `status` and cost."""

    def __init__(self, pool: PoolClient, max_trainings: int | None = None,
                 warm_trainers: bool = False, on_gpu: bool = False):
        self.pool = pool
        self.jobs: dict[str, _Job] = {}
        # One trainer for all of this actor's jobs: the cap on trainings at once holds across them.
        # on_gpu: the pool is on GPUs (PoolConfig.on_gpus), so trainings default to GPUs.
        self.trainer = TrainerService(max_trainings, warm=warm_trainers, on_gpu=on_gpu)

    async def submit(self, req: JobRequest) -> str:
        if req.job in self.jobs:
            raise ValueError(f"job id {req.job!r} is already in use; give each job its own id")
        job = _Job(req)
        self.jobs[req.job] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return req.job

    async def _run(self, job: _Job) -> None:
        try:
            await run_job(job.req, self.pool, job, self.trainer)
            job.state = "done"
        except asyncio.CancelledError:
            job.state = "cancelled"
        except Exception as e:  # noqa: BLE001 - surfaced to the caller via status/poll
            job.state = "failed"
            job.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        finally:
            job.t1 = time.perf_counter()
            job.changed.set()
            release_memory()

    def _get(self, job_id: str) -> _Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise KeyError(f"no job {job_id!r}; jobs: {sorted(self.jobs)}") from None

    async def poll(self, job_id: str, timeout: float = 1.0) -> tuple[list[Record], JobStatus]:
        """Records finished since the last poll (waits up to `timeout` for at least one)."""
        job = self._get(job_id)
        if not job.pending and job.state == "running":
            job.changed.clear()
            try:
                await asyncio.wait_for(job.changed.wait(), timeout)
            except TimeoutError:
                pass
        recs, job.pending = job.pending, []
        return recs, job.status()

    async def status(self, job_id: str) -> JobStatus:
        return self._get(job_id).status()

    async def cancel(self, job_id: str) -> None:
        job = self._get(job_id)
        if job.task and not job.task.done():
            job.task.cancel()

    async def list_jobs(self) -> list[JobStatus]:
        return [j.status() for j in self.jobs.values()]
