"""`moco-ray run`: strategies x tasks over one live pool, records to Parquet, a summary table.

A plain function over the layers below: load and validate the config (all before any engine
starts), load the tasks, start the pool, hand every job to the coordinator at once, stream the
records back, write them, and return them with a summary.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from moco_ray.config import JobSpec, RunConfig
from moco_ray.coordinator import Coordinator, JobRequest, JobStatus
from moco_ray.records import Cost, Record
from moco_ray.tasks.base import Task


class SummaryRow(BaseModel):
    strategy: str
    task: str
    split: str
    n: int
    score: float
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class SweepResult(BaseModel):
    out_dir: str
    records: list[Record]
    summary: list[SummaryRow]
    jobs: list[JobStatus]


def load_tasks(cfg: RunConfig) -> dict[str, Task]:
    """Load every task on the driver, so a bad row fails before any engine starts."""
    from moco_ray.tasks.loaders import load_task

    return {t.name: load_task(t) for t in cfg.tasks}


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to $RAY_ADDRESS if set, else start a local Ray (token auth off for local runs)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A local run shares one machine between the pool, Ray Data and the trainers; engines sit
    # idle while trainers run, so declare more logical CPUs than cores rather than deadlock
    # (a Ray Data task waiting forever for a CPU the pool's replicas hold).
    ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)


def job_requests(cfg: RunConfig, tasks: dict[str, Task]) -> list[JobRequest]:
    reqs = []
    for i, j in enumerate(cfg.jobs):
        for t in cfg.tasks:
            reqs.append(job_request(cfg, j, tasks[t.name], f"{i}-{j.name or j.strategy}-{t.name}"))
    return reqs


def job_request(cfg, job: JobSpec, task: Task, job_id: str, generation: int = 0,
                splits: tuple | None = None) -> JobRequest:
    """One JobRequest; a logit-level job runs on its group's members, in the group's order
    (fusion weights are per member)."""
    from moco_ray.strategies.base import get_strategy

    groups = {g.name: g for g in cfg.pool.logit_groups}
    group = job.logit_group or next(iter(groups), None)
    models = job.models or [m.name for m in cfg.pool.members]
    scratch = job.scratch or next((m.name for m in cfg.pool.scratch), None)
    if get_strategy(job.strategy).level == "logit" and group is not None:
        models = list(groups[group].models)
    return JobRequest(job=job_id, strategy=job.strategy, params=job.params, task=task,
                      models=models, splits=tuple(splits or job.splits), logit_group=group,
                      scratch=scratch, seed=cfg.seed, concurrency=cfg.concurrency, run=cfg.run_name,
                      generation=generation)


def summarize(records: list[Record], jobs: list[JobStatus]) -> list[SummaryRow]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.job, r.strategy, r.task, r.split)].append(r)
    secs = {j.job: j.seconds for j in jobs}
    rows = []
    for (job, strat, task, split), rs in sorted(groups.items(), key=lambda kv: kv[0][1:]):
        cost = Cost()
        for r in rs:
            for c in r.cost.values():
                cost = cost.add(c)
        rows.append(SummaryRow(
            strategy=strat, task=task, split=split, n=len(rs),
            score=sum(r.score or 0.0 for r in rs) / len(rs), prompt_tokens=cost.prompt_tokens,
            completion_tokens=cost.completion_tokens, seconds=secs.get(job, 0.0)))
    return rows


def run_jobs(coordinator, reqs: list[JobRequest],
             on_progress: Callable[[JobStatus, int], None] | None = None,
             max_jobs: int | None = None) -> tuple[list[Record], list[JobStatus]]:
    """Submit the jobs (all at once, or at most `max_jobs` in flight, the next one as soon as
    one ends; they share the pool) and stream their records back."""
    import ray

    waiting = list(reqs)
    live: list[str] = []
    records: list[Record] = []
    final: dict[str, JobStatus] = {}
    while len(final) < len(reqs):
        room = len(waiting) if max_jobs is None else max(0, max_jobs - len(live))
        batch, waiting = waiting[:room], waiting[room:]
        ray.get([coordinator.submit.remote(r) for r in batch])
        live += [r.job for r in batch]
        for job, (recs, st) in zip(list(live),
                                   ray.get([coordinator.poll.remote(j, 0.5) for j in live])):
            records += recs
            if on_progress:
                on_progress(st, len(recs))
            if st.state != "running":
                final[job] = st
                live.remove(job)
    failed = [s for s in final.values() if s.state == "failed"]
    if failed:
        # Keep what finished: the caller writes the records before raising.
        raise JobsFailed(records, list(final.values()), failed)
    return records, [final[r.job] for r in reqs]


class JobsFailed(RuntimeError):
    def __init__(self, records: list[Record], jobs: list[JobStatus], failed: list[JobStatus]):
        self.records, self.jobs = records, jobs
        super().__init__("jobs failed:\n" + "\n".join(f"{s.job}: {s.error}" for s in failed))


def run_config(cfg: RunConfig, on_progress=None, pool=None) -> SweepResult:
    """Run every job of `cfg`; `pool` reuses a started ModelPool (else one is started and
    shut down here)."""
    import ray

    from moco_ray.outputs import write_records
    from moco_ray.pool.pool import ModelPool

    tasks = load_tasks(cfg)
    out_dir = Path(cfg.output_dir) / cfg.run_name
    init_ray()
    own_pool = pool is None
    pool = pool or ModelPool(cfg.pool, seed=cfg.seed)
    try:
        if own_pool:
            pool.start()
        coord = Coordinator.remote(pool.client())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            records, jobs = run_jobs(coord, job_requests(cfg, tasks), on_progress,
                                      max_jobs=cfg.max_jobs)
        except JobsFailed as e:
            if e.records:
                write_records(e.records, out_dir / f"records-{stamp}-partial")
            raise
        finally:
            ray.kill(coord)
        write_records(records, out_dir / f"records-{stamp}")
        return SweepResult(out_dir=str(out_dir), records=records,
                           summary=summarize(records, jobs), jobs=jobs)
    finally:
        if own_pool:
            pool.shutdown()
