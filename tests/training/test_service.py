"""The cap on adapter trainings at once (`RunConfig.max_trainings` -> the coordinator's
`TrainerService(max_trainings)`): pure logic over a training function that counts how many run together."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from moco_ray.training.service import TrainerService


class CountingTrain:
    """Counts the Ray Train runs in flight together: a call with runs=None starts one run per
    spec, a call with runs=1 one run for all its specs."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds
        self.now = self.peak = 0
        self.calls: list[tuple[list[str], int | None]] = []
        self.lock = threading.Lock()

    def __call__(self, specs: list, runs: int | None) -> dict:
        n = len(specs) if runs is None else runs
        with self.lock:
            self.now += n
            self.peak = max(self.peak, self.now)
            self.calls.append(([s.model for s in specs], runs))
        time.sleep(self.seconds)
        with self.lock:
            self.now -= n
        return {s.model: f"info-{s.model}" for s in specs}


def _jobs(ctx, train, names, n_jobs, cap=None):
    """`n_jobs` jobs of one event loop sharing one trainer (as in the coordinator), each
    training `names`."""
    trainer = TrainerService(max_trainings=cap)
    specs = [SimpleNamespace(model=n) for n in names]

    async def go():
        return await asyncio.gather(*(trainer.run_trainings(ctx, specs, train)
                                      for _ in range(n_jobs)))

    return asyncio.run(go())


def test_without_a_cap_every_spec_of_every_job_trains_at_once():
    ctx, train = SimpleNamespace(cost={}), CountingTrain()
    out = _jobs(ctx, train, ["a", "b", "c"], 2)
    assert out == [{"a": "info-a", "b": "info-b", "c": "info-c"}] * 2
    assert train.peak == 6 and train.calls == [(["a", "b", "c"], None)] * 2
    assert ctx.cost["train:a"].calls == 2 and ctx.cost["train:a"].engine_seconds > 0


@pytest.mark.parametrize(("cap", "groups"), [(1, [["a", "b", "c"]]), (2, [["a", "c"], ["b"]]),
                                             (5, [["a"], ["b"], ["c"]])])
def test_a_cap_bounds_runs_across_jobs_and_packs_each_jobs_specs(cap, groups):
    ctx, train = SimpleNamespace(cost={}), CountingTrain()
    out = _jobs(ctx, train, ["a", "b", "c"], 2, cap)
    assert out == [{"a": "info-a", "b": "info-b", "c": "info-c"}] * 2
    # Never more runs together than the cap (both jobs compete for the slots).
    assert train.peak == min(cap, 2 * len(groups))
    # Each job's specs are dealt into min(cap, 3) groups, each trained in turn in one run.
    assert sorted(train.calls) == sorted([(g, 1) for g in groups] * 2)
    assert {k: v.calls for k, v in ctx.cost.items()} == {"train:a": 2, "train:b": 2,
                                                         "train:c": 2}


def test_bad_cap_is_refused():
    with pytest.raises(ValueError, match=">= 1"):
        TrainerService(max_trainings=0)


def test_a_warm_service_trains_on_warm_trainers_of_its_own(monkeypatch, tmp_path):
    """Nothing process-wide: a warm service hands its own warm trainers to every training, and
    the process's (`launch.keep_warm`) stay off; a cold service hands none."""
    from moco_ray.training import launch
    from moco_ray.training import service as service_mod
    from moco_ray.training.warm import WarmTrainers

    seen = []

    def fake_distill_all(specs, cfg, runs, warm):
        seen.append(warm)
        return {s.model: SimpleNamespace(path=s.out_dir) for s in specs}

    monkeypatch.setattr(service_mod, "distill_all", fake_distill_all)

    class Pool:
        async def weights_path(self, model):
            return f"/weights/{model}"

    ctx = SimpleNamespace(cost={}, models=["m"], workdir=str(tmp_path), pool=Pool())
    warm, cold = TrainerService(warm=True), TrainerService()
    try:
        for svc in (warm, cold):
            paths = asyncio.run(svc.train_adapters(ctx, {"a": ("m", [{"messages": []}])}))
            assert paths["a"].startswith(str(tmp_path))
    finally:
        warm.close()
    assert isinstance(seen[0], WarmTrainers) and seen[1] is None
    assert launch.warm_trainers() == {}
    with pytest.raises(RuntimeError, match="stopped"):  # closed: no job reaches a dead run
        seen[0].host(("k",), None)


def test_run_storage_follows_the_shared_workdir(monkeypatch, tmp_path):
    """Ray Train storage of a run without storage_path: under $MOCO_RAY_WORKDIR when set (every
    node sees it on a cluster), else the node's temp dir."""
    import tempfile

    from moco_ray.training.runs import scratch_storage

    monkeypatch.setenv("MOCO_RAY_WORKDIR", str(tmp_path / "shared"))
    d = scratch_storage("moco_distill_")
    assert d.startswith(str(tmp_path / "shared" / "moco_distill_"))
    monkeypatch.delenv("MOCO_RAY_WORKDIR")
    assert scratch_storage("moco_warm_").startswith(tempfile.gettempdir())
