"""`moco-ray run`: strategies x tasks over one live pool, records to Parquet, a summary table.

A plain function over the layers below: load and validate the config (all before any engine
starts), load the tasks, start the pool, hand every job to the coordinator at once, stream the
records back, write them, and return them with a summary.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

from pydantic import BaseModel

from moco_ray.config import JobSpec, RunConfig
from moco_ray.coordinator import Coordinator, JobRequest, JobStatus
from moco_ray.outputs import write_records
from moco_ray.pool.pool import ModelPool
from moco_ray.records import Cost, Record
from moco_ray.strategies.registry import get_strategy
from moco_ray.tasks.base import Task
from moco_ray.workflows.jobstore import JobStore
from moco_ray.workflows.runtime import init_ray, job_env, load_tasks
from moco_ray.workflows.storage import RunPaths, check_run_storage, storage_env

log = logging.getLogger(__name__)


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


def job_ids(cfg: RunConfig) -> list[tuple[str, JobSpec, str]]:
    """(job id, job spec, task name) for every strategy x task of `cfg`, in config order."""
    return [(f"{i}-{j.name or j.strategy}-{t.name}", j, t.name)
            for i, j in enumerate(cfg.jobs) for t in cfg.tasks]


def job_requests(cfg: RunConfig, tasks: dict[str, Task]) -> list[JobRequest]:
    return [job_request(cfg, j, tasks[t], job_id) for job_id, j, t in job_ids(cfg)]


def job_request(cfg, job: JobSpec, task: Task, job_id: str, generation: int = 0,
                splits: tuple | None = None) -> JobRequest:
    """One JobRequest; a logit-level job runs on its group's members, in the group's order
    (fusion weights are per member)."""
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


# Restarts of a coordinator actor that died (its process or node): the driver then hands the
# restarted actor every job it had in flight, less the examples already recorded (`run_jobs`).
COORDINATOR_RESTARTS = 3


def coordinator_name(run_name: str) -> str:
    return f"moco-coordinator-{run_name}"


def start_coordinator(pool, name: str | None = None, **kw):
    """A Coordinator actor over `pool` (a PoolClient) that carries the job env itself: on a Ray
    started before this run (tests, a notebook) the job's env lacks this run's dirs
    (workflows/storage.py), and what the coordinator starts (trainers) inherits its env. Ray
    restarts it up to COORDINATOR_RESTARTS times if it dies; `run_jobs` resubmits its jobs. It is
    pinned to the driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a 0-CPU actor may land on any node, and losing a worker node must
    # not take the coordinator with it (the driver's node going takes the run anyway).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Coordinator.options(runtime_env=job_env(), name=name, scheduling_strategy=here,
                               max_restarts=COORDINATOR_RESTARTS).remote(pool, **kw)


def run_jobs(coordinator, reqs: list[JobRequest],
             on_progress: Callable[[JobStatus, int], None] | None = None,
             max_jobs: int | None = None,
             on_done: Callable[[JobStatus, list[Record]], None] | None = None,
             on_records: Callable[[str, list[Record]], None] | None = None,
             ) -> tuple[list[Record], list[JobStatus]]:
    """Submit the jobs (all at once, or at most `max_jobs` in flight, the next one as soon as
    one ends; they share the pool) and stream their records back. `on_records(job, records)`
    gets each batch as it arrives, `on_done` each job's final status and all its records as
    soon as it ends (to save them then)."""
    import ray

    waiting = list(reqs)
    by_id = {r.job: r for r in reqs}
    live: list[str] = []
    records: list[Record] = []
    per_job: dict[str, list[Record]] = defaultdict(list)
    final: dict[str, JobStatus] = {}
    while len(final) < len(reqs):
        room = len(waiting) if max_jobs is None else max(0, max_jobs - len(live))
        batch, waiting = waiting[:room], waiting[room:]
        live += [r.job for r in batch]
        try:
            ray.get([coordinator.submit.remote(r) for r in batch])
            polled = ray.get([coordinator.poll.remote(j, 0.5) for j in live])
        except ray.exceptions.RayActorError:
            # The coordinator died (and Ray restarts it, see start_coordinator) with its jobs'
            # state: hand the new one every live job again, less what it already sent us.
            resubmit(coordinator, [by_id[j] for j in live], per_job)
            continue
        for job, (recs, st) in zip(list(live), polled):
            records += recs
            per_job[job] += recs
            if on_records and recs:
                on_records(job, recs)
            if on_progress:
                on_progress(st, len(recs))
            if st.state != "running":
                final[job] = st
                live.remove(job)
                if on_done:
                    on_done(st, per_job.pop(job))
    failed = [s for s in final.values() if s.state == "failed"]
    if failed:
        # Keep what finished: the caller writes the records before raising.
        raise JobsFailed(records, list(final.values()), failed)
    return records, [final[r.job] for r in reqs]


def resubmit(coordinator, reqs: list[JobRequest], got: dict[str, list[Record]],
             timeout_s: float = 600.0) -> None:
    """After the coordinator died: wait for Ray's restart of it, then submit `reqs` again, each
    skipping the examples whose records `got` holds. A call is a pure function of prompt, params
    and seed, so the examples in flight at the death run again with the same outcome: nothing
    lost, nothing recorded twice. A job's fit runs again; its status counts (done, cost) start
    over in the new actor (the records keep each example's own cost)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(coordinator.list_jobs.remote(), timeout=60)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            if time.monotonic() > deadline or _gone_for_good(coordinator):
                raise CoordinatorLost(
                    f"the coordinator died and did not come back within {timeout_s:g}s (or "
                    f"used its {COORDINATOR_RESTARTS} restarts): {e}") from e
            time.sleep(0.5)
    log.warning("coordinator restarted: resubmitting %d job(s), skipping the examples already "
                "recorded", len(reqs))
    ray.get([coordinator.submit.remote(r.model_copy(update={
        "skip": r.skip | {(x.split, x.example_id) for x in got.get(r.job, [])}}))
        for r in reqs])


def _gone_for_good(coordinator) -> bool:
    """Whether Ray reports the actor DEAD (no restart left), not RESTARTING."""
    import ray

    try:
        info = ray.util.state.get_actor(coordinator._actor_id.hex())
    except Exception:  # noqa: BLE001 (no state API here: keep waiting until the deadline)
        return False
    return info is not None and info.state == "DEAD"


class CoordinatorLost(RuntimeError):
    """The coordinator actor died for good; the records received so far were saved."""


class JobsFailed(RuntimeError):
    def __init__(self, records: list[Record], jobs: list[JobStatus], failed: list[JobStatus]):
        self.records, self.jobs = records, jobs
        super().__init__("jobs failed:\n" + "\n".join(f"{s.job}: {s.error}" for s in failed))


def run_config(cfg: RunConfig, on_progress=None, pool=None, resume: bool = True,
               on_resumed: Callable[[int, int], None] | None = None) -> SweepResult:
    """Run every job of `cfg`; `pool` reuses a started ModelPool (else one is started and
    shut down here). Each job's records are saved as it ends; with `resume`, jobs a previous
    run of the same config finished are taken from there, not run again (`on_resumed(n_saved,
    n_jobs)` is told how many), and if none is left no pool starts. Every file goes under
    `<storage>/<run_name>/` (workflows/storage.py), checked writable and shared by every node of
    the cluster before the pool starts."""
    tasks = load_tasks(cfg)
    paths = RunPaths.of(cfg.storage, cfg.run_name)
    with storage_env(paths):
        return _run(cfg, tasks, paths, on_progress, pool, resume, on_resumed)


def _run(cfg: RunConfig, tasks: dict[str, Task], paths: RunPaths, on_progress, pool,
         resume: bool, on_resumed) -> SweepResult:
    import ray

    out_dir = paths.root
    store = JobStore(out_dir, cfg)
    reqs = job_requests(cfg, tasks)
    prints = {job_id: store.fingerprint(j, t) for job_id, j, t in job_ids(cfg)}
    saved: dict[str, tuple[list[Record], JobStatus]] = {}
    if resume:
        for r in reqs:
            got = store.load(r.job, prints[r.job])
            if got is not None:
                saved[r.job] = got
    if on_resumed:
        on_resumed(len(saved), len(reqs))
    # Unfinished jobs keep the examples an earlier run recorded; they run the rest (under
    # resume=False every job starts over, and what earlier runs kept of it goes).
    if not resume:
        for r in reqs:
            store.discard_partial(r.job)
    earlier = {r.job: store.partial(r.job, prints[r.job]) for r in reqs if r.job not in saved}
    todo = [r.model_copy(update={"skip": frozenset((x.split, x.example_id)
                                                   for x in earlier[r.job])})
            for r in reqs if r.job not in saved]
    records = [rec for recs, _ in saved.values() for rec in recs]
    records += [rec for recs in earlier.values() for rec in recs]
    statuses = {job: st for job, (_, st) in saved.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def finish() -> SweepResult:
        write_records(records, out_dir / f"records-{stamp}")
        jobs = [statuses[r.job] for r in reqs]
        return SweepResult(out_dir=str(out_dir), records=records,
                           summary=summarize(records, jobs), jobs=jobs)

    init_ray()
    check_run_storage(paths)
    if not todo:
        return finish()

    def on_done(st: JobStatus, recs: list[Record]) -> None:
        if st.state == "done":
            store.save(st, earlier[st.job] + recs, prints[st.job])

    def on_records(job: str, recs: list[Record]) -> None:
        store.append(job, recs, prints[job])

    own_pool = pool is None
    pool = pool or ModelPool(cfg.pool, seed=cfg.seed)
    try:
        if own_pool:
            pool.start()
        coord = start_coordinator(pool.client(), name=coordinator_name(cfg.run_name),
                                  max_trainings=cfg.max_trainings,
                                  warm_trainers=cfg.warm_trainers, on_gpu=cfg.pool.on_gpus)
        try:
            new, jobs = run_jobs(coord, todo, on_progress, max_jobs=cfg.max_jobs,
                                 on_done=on_done, on_records=on_records)
        except JobsFailed as e:
            if e.records or records:
                write_records(records + e.records, out_dir / f"records-{stamp}-partial")
            raise
        finally:
            ray.kill(coord)
        records += new
        statuses.update({s.job: s for s in jobs})
        return finish()
    finally:
        if own_pool:
            pool.shutdown()
