"""Coordinator logic over a scripted pool: concurrency, streaming, cost, dev/test separation."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from typing import ClassVar

import pytest

from moco_ray.coordinator import Coordinator, JobRequest, run_job
from moco_ray.records import Generation, SamplingParams, Score
from moco_ray.strategies.base import Answer, Strategy, register
from moco_ray.tasks.base import DevSplit, Example, Task, TestSplit


class ScriptedPool:
    """Answers every prompt with the model's name; counts tokens; records peak concurrency."""

    def __init__(self, models, delay=0.01):
        self.models = list(models)
        self.delay = delay
        self.inflight = 0
        self.peak = 0

    async def generate(self, model, prompts, params, lora=None):
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        await asyncio.sleep(self.delay)
        self.inflight -= 1
        return [Generation(text=model, token_ids=[1, 2], prompt_tokens=5, completion_tokens=2,
                           model=model, version=3, engine_seconds=0.001) for _ in prompts]

    async def score(self, model, prompt, continuations, lora=None):
        return [Score(sum_logprob=-1.0, mean_logprob=-1.0, num_tokens=1) for _ in continuations]

    async def fused_generate(self, group, prompts, params, mode, weights):
        raise NotImplementedError

    def render(self, model, prompt):
        return str(prompt)


def _task(n_dev=3, n_test=5) -> Task:
    ex = lambda i: Example(id=str(i), question=f"q{i}", reference="m1")
    return Task(name="toy", kind="exact_match",
                dev=DevSplit(task="toy", examples=tuple(ex(i) for i in range(n_dev))),
                test=TestSplit(task="toy", examples=tuple(ex(100 + i) for i in range(n_test))),
                format=lambda e: e.question, extract=lambda out, e: out.strip(),
                metric=lambda ans, e: float(ans == e.reference))


@register("test_ask_all")
class AskAll(Strategy):
    """Test strategy: asks every model, answers with the last; fit asks model 0 on dev."""

    level = "text"
    seen_in_fit: ClassVar[list[str]] = []

    async def fit(self, ctx, dev):
        for ex in dev:
            AskAll.seen_in_fit.append(ex.id)
            await ctx.example(ex).generate(ctx.models[0], ex.question, SamplingParams())

    async def solve(self, ctx, example):
        outs = [(await ctx.generate(m, example.question, SamplingParams()))[0].text
                for m in ctx.models]
        # The pool's peak of calls in flight so far (jobs share one pool in the actor).
        return Answer(output=outs[-1], meta={"peak": getattr(ctx.job.pool, "peak", 0)})


def test_run_job_records_trace_cost_and_fit_on_dev_only():
    pool = ScriptedPool(["m0", "m1"])
    AskAll.seen_in_fit.clear()
    req = JobRequest(job="j", strategy="test_ask_all", task=_task(), models=["m0", "m1"])
    recs = asyncio.run(run_job(req, pool))
    assert sorted(r.example_id for r in recs) == [str(100 + i) for i in range(5)]
    assert AskAll.seen_in_fit == ["0", "1", "2"]  # fit saw dev ids only
    r = recs[0]
    assert r.output == "m1" and r.score == 1.0 and r.split == "test"
    assert [t.model for t in r.trace] == ["m0", "m1"]
    assert r.model_versions == {"m0": 3, "m1": 3}
    assert r.cost["m0"].prompt_tokens == 5 and r.cost["m1"].completion_tokens == 2


def test_fit_refuses_test_split():
    strat = AskAll()
    from moco_ray.strategies.base import StrategyContext

    ctx = StrategyContext(ScriptedPool(["m0"]), _task(), ["m0"])
    with pytest.raises(TypeError, match="dev data only"):
        asyncio.run(strat.fit_checked(ctx, _task().test))


def test_concurrency_limit_respected():
    pool = ScriptedPool(["m0"], delay=0.02)
    req = JobRequest(job="j", strategy="test_ask_all", task=_task(n_test=20), models=["m0"],
                     concurrency=4)
    asyncio.run(run_job(req, pool))
    assert pool.peak == 4


def test_coordinator_actor_runs_jobs_concurrently_and_counts_cost(ray_session):
    import ray

    pool = ScriptedPool(["m0", "m1"], delay=0.05)
    coord = Coordinator.remote(pool)
    reqs = [JobRequest(job=f"j{i}", strategy="test_ask_all", task=_task(n_test=8),
                       models=["m0", "m1"], concurrency=8) for i in range(3)]
    ray.get([coord.submit.remote(r) for r in reqs])
    with pytest.raises(ray.exceptions.RayTaskError, match="already in use"):
        ray.get(coord.submit.remote(reqs[0]))
    got = {r.job: [] for r in reqs}
    states = {}
    while len(states) < 3:
        for r in reqs:
            recs, st = ray.get(coord.poll.remote(r.job, 0.2))
            got[r.job] += recs
            if st.state != "running":
                states[r.job] = st
    for r in reqs:
        st = states[r.job]
        assert st.state == "done", st.error
        assert len(got[r.job]) == 8 and st.done == 8
        # 3 dev calls to m0 in fit + 8 test examples x 1 call per model.
        assert st.cost["m0"].calls == 11 and st.cost["m1"].calls == 8
        assert st.cost["m0"].prompt_tokens == 55
    # Each job keeps at most 8 calls in flight: a peak above 8 means jobs ran side by side.
    assert max(rec.meta["peak"] for recs in got.values() for rec in recs) > 8
    ray.kill(coord)


def test_failed_job_reports_error(ray_session):
    import ray

    coord = Coordinator.remote(ScriptedPool(["m0"]))
    req = JobRequest(job="bad", strategy="test_ask_all", task=_task(), models=["m0"],
                     params={"nope": 1})
    ray.get(coord.submit.remote(req))
    while True:
        _, st = ray.get(coord.poll.remote("bad", 0.2))
        if st.state != "running":
            break
    assert st.state == "failed" and "nope" in st.error
    ray.kill(coord)


@pytest.mark.parametrize("max_jobs", [1, 2])
def test_run_jobs_keeps_at_most_max_jobs_in_flight(ray_session, max_jobs):
    import ray

    from moco_ray.workflows.sweep import run_jobs

    pool = ScriptedPool(["m0"], delay=0.05)
    coord = Coordinator.remote(pool)
    reqs = [JobRequest(job=f"mj{max_jobs}-{i}", strategy="test_ask_all", task=_task(n_test=8),
                       models=["m0"], concurrency=8) for i in range(3)]
    records, jobs = run_jobs(coord, reqs, max_jobs=max_jobs)
    assert [j.job for j in jobs] == [r.job for r in reqs]
    assert all(j.state == "done" for j in jobs) and len(records) == 24
    # One job keeps at most 8 calls in flight, so the pool's peak bounds the jobs side by side.
    peak = max(rec.meta["peak"] for rec in records)
    assert 8 * (max_jobs - 1) < peak <= 8 * max_jobs
    ray.kill(coord)


class _PoolHandle:
    """Stands in for a started ModelPool: `run_config` only asks it for a client."""

    def __init__(self, client):
        self._client = client

    def client(self):
        return self._client


def test_run_config_saves_each_job_and_resumes_only_unfinished(ray_session, tmp_path,
                                                               monkeypatch):
    from moco_ray.config import JobSpec, ModelSpec, PoolConfig, RunConfig, TaskSpec
    from moco_ray.workflows.sweep import run_config

    cfg = RunConfig(
        run_name="resume", storage=str(tmp_path), pool=PoolConfig(models=[
            ModelSpec(name="m0", path="unused"), ModelSpec(name="m1", path="unused")]),
        tasks=[TaskSpec(name="reverse", source="synthetic", dev_limit=3, test_limit=4)],
        jobs=[JobSpec(strategy="test_ask_all", name="a"),
              JobSpec(strategy="test_ask_all", name="b", models=["m0"])])
    ran: set[str] = set()

    def run(c, **kw):
        return run_config(c, pool=_PoolHandle(ScriptedPool(["m0", "m1"])),
                          on_progress=lambda st, _n: ran.add(st.job), **kw)

    first = run(cfg)
    assert ran == {"0-a-reverse", "1-b-reverse"} and len(first.records) == 8
    jobs_dir = tmp_path / "resume" / "jobs"
    assert sorted(p.name for p in jobs_dir.iterdir()) == [
        "0-a-reverse.json", "0-a-reverse.parquet", "1-b-reverse.json", "1-b-reverse.parquet"]

    # Cut off before job b was saved: a rerun runs b only and keeps a's records as they were.
    for p in jobs_dir.glob("1-b-*"):
        p.unlink()
    ran.clear()
    second = run(cfg)
    assert ran == {"1-b-reverse"}
    key = lambda r: (r.job, r.example_id)
    assert sorted(map(key, second.records)) == sorted(map(key, first.records))
    a_first = {r.example_id: r.model_dump() for r in first.records if r.job == "0-a-reverse"}
    a_second = {r.example_id: r.model_dump() for r in second.records if r.job == "0-a-reverse"}
    assert a_first == a_second
    assert {(s.strategy, s.n) for s in second.summary} == {(s.strategy, s.n)
                                                          for s in first.summary}

    # A changed job (other models) runs again; so does every job under --fresh.
    changed = cfg.model_copy(update={"jobs": [cfg.jobs[0], JobSpec(
        strategy="test_ask_all", name="b", models=["m1"])]})
    ran.clear()
    third = run(changed)
    assert ran == {"1-b-reverse"}
    assert {r.output for r in third.records if r.job == "1-b-reverse"} == {"m1"}
    ran.clear()
    run(changed, resume=False)
    assert ran == {"0-a-reverse", "1-b-reverse"}

    # All saved: no pool is started at all.
    import moco_ray.workflows.sweep as sweep_mod

    def no_pool(*a, **k):
        raise AssertionError("a pool was started although every job was saved")

    monkeypatch.setattr(sweep_mod, "ModelPool", no_pool)
    told = []
    last = run_config(changed, on_resumed=lambda n, total: told.append((n, total)))
    assert told == [(2, 2)] and len(last.records) == 8


def test_release_memory_returns_what_worker_threads_freed():
    """Tensors made in worker threads (as weight jobs read models) and freed: glibc keeps the
    pages in per-thread arenas until `release_memory` trims them."""
    code = textwrap.dedent("""
        import asyncio, gc
        import torch
        from moco_ray.memory import release_memory
        def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        def make(i): return [torch.ones(1 << 20) * i for _ in range(100)]  # 100 x 4 MiB
        async def main():
            for _ in range(2):
                parts = await asyncio.gather(*(asyncio.to_thread(make, i) for i in range(3)))
                del parts
                await asyncio.sleep(0)
                gc.collect()
            before = rss()
            release_memory()
            print("RSS_MB", before, rss())
        asyncio.run(main())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    before, after = (float(x) for x in res.stdout.split("RSS_MB")[1].split())
    assert before - after > 500, (before, after)  # of the ~1.2 GiB the threads had made


@register("test_fail_on_flag")
class FailOnFlag(Strategy):
    """Test strategy: answers in example order, logs each example it solves to `log`, and fails
    at the third example while the file `flag` exists (a run cut off mid-job)."""

    level = "text"

    class Params(Strategy.Params):
        flag: str
        log: str

    async def solve(self, ctx, example):
        from pathlib import Path

        log = Path(self.params.log)
        solved = log.read_text().split() if log.exists() else []
        if len(solved) >= 2 and Path(self.params.flag).exists():
            raise RuntimeError("cut off")
        log.write_text("".join(f"{i}\n" for i in [*solved, example.id]))
        [g] = await ctx.generate(ctx.models[0], ctx.task.prompt(example), SamplingParams())
        return Answer(output=g.text)


def test_a_job_cut_off_mid_way_reruns_only_its_unfinished_examples(ray_session, tmp_path):
    from moco_ray.config import JobSpec, ModelSpec, PoolConfig, RunConfig, TaskSpec
    from moco_ray.workflows.sweep import JobsFailed, run_config

    flag, log = tmp_path / "flag", tmp_path / "solved.log"
    flag.touch()
    cfg = RunConfig(
        run_name="cut", storage=str(tmp_path), concurrency=1,
        pool=PoolConfig(models=[ModelSpec(name="m0", path="unused")]),
        tasks=[TaskSpec(name="reverse", source="synthetic", dev_limit=2, test_limit=6)],
        jobs=[JobSpec(strategy="test_fail_on_flag",
                      params={"flag": str(flag), "log": str(log)})])
    run = lambda: run_config(cfg, pool=_PoolHandle(ScriptedPool(["m0"])))

    with pytest.raises(JobsFailed, match="cut off"):
        run()
    first = log.read_text().split()
    partial = list((tmp_path / "cut" / "jobs").glob("*.partial/*.parquet"))
    assert first and partial  # what ran before the cut was kept as it streamed in

    flag.unlink()
    log.write_text("")
    done = run()
    second = log.read_text().split()
    ids = sorted(r.example_id for r in done.records)
    assert len(ids) == 6 and len(set(ids)) == 6  # nothing lost, nothing twice
    assert not set(first) & set(second)  # the rerun ran only what the cut left undone
    assert sorted(first + second) == ids
    # Saved whole now: the partial records are gone, and a third run runs nothing.
    assert not list((tmp_path / "cut" / "jobs").glob("*.partial"))
    log.write_text("")
    assert len(run().records) == 6 and log.read_text() == ""


def test_coordinator_killed_mid_sweep_restarts_and_resumes_its_jobs(ray_session, tmp_path):
    """A real kill of the coordinator actor mid-sweep: Ray restarts it, the driver resubmits
    the jobs in flight less the examples already recorded; the records match a clean run's."""
    import threading

    import ray

    from moco_ray.config import JobSpec, ModelSpec, PoolConfig, RunConfig, TaskSpec
    from moco_ray.workflows.sweep import coordinator_name, run_config

    cfg = RunConfig(
        run_name="killcoord", storage=str(tmp_path), concurrency=1,
        pool=PoolConfig(models=[ModelSpec(name="m0", path="unused"),
                                ModelSpec(name="m1", path="unused")]),
        tasks=[TaskSpec(name="reverse", source="synthetic", dev_limit=2, test_limit=10),
               TaskSpec(name="max", source="synthetic", dev_limit=2, test_limit=10)],
        jobs=[JobSpec(strategy="test_ask_all")])
    killed: list[int] = []

    def on_progress(st, _new):
        # Once some examples are in (and not all): kill the actor, letting Ray restart it.
        if not killed and 3 <= st.done < st.total:
            killed.append(st.done)
            actor = ray.get_actor(coordinator_name("killcoord"))
            threading.Thread(target=ray.kill, args=(actor,), kwargs={"no_restart": False},
                             daemon=True).start()

    got = run_config(cfg, pool=_PoolHandle(ScriptedPool(["m0", "m1"], delay=0.1)),
                     on_progress=on_progress)
    assert killed, "the sweep ended before the kill"
    ids = [(r.task, r.example_id) for r in got.records]
    assert len(ids) == 20 and len(set(ids)) == 20  # nothing lost, nothing recorded twice
    assert all(j.state == "done" for j in got.jobs)
    clean = run_config(cfg.model_copy(update={"run_name": "clean"}),
                       pool=_PoolHandle(ScriptedPool(["m0", "m1"])))
    assert sorted(ids) == sorted((r.task, r.example_id) for r in clean.records)
    assert sorted((r.task, r.example_id, r.output) for r in got.records) == \
        sorted((r.task, r.example_id, r.output) for r in clean.records)
