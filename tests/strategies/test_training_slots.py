"""The cap on adapter trainings at once (`RunConfig.max_trainings` -> the coordinator's
`limit_trainings`): pure logic over a training function that counts how many run together."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from moco_ray.strategies import training


class CountingTrain:
    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds
        self.now = self.peak = 0
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, specs: list) -> dict:
        with self.lock:
            self.now += len(specs)
            self.peak = max(self.peak, self.now)
            self.calls.append([s.model for s in specs])
        time.sleep(self.seconds)
        with self.lock:
            self.now -= len(specs)
        return {s.model: f"info-{s.model}" for s in specs}


def _jobs(ctx, train, names, n_jobs):
    """`n_jobs` jobs of one event loop (as in the coordinator), each training `names`."""
    specs = [SimpleNamespace(model=n) for n in names]

    async def go():
        return await asyncio.gather(*(training.run_trainings(ctx, specs, train)
                                      for _ in range(n_jobs)))

    return asyncio.run(go())


@pytest.fixture(autouse=True)
def _no_cap_after():
    yield
    training.limit_trainings(None)


def test_without_a_cap_every_spec_of_every_job_trains_at_once():
    ctx, train = SimpleNamespace(cost={}), CountingTrain()
    out = _jobs(ctx, train, ["a", "b", "c"], 2)
    assert out == [{"a": "info-a", "b": "info-b", "c": "info-c"}] * 2
    assert train.peak == 6 and sorted(map(len, train.calls)) == [3, 3]
    assert ctx.cost["train:a"].calls == 2 and ctx.cost["train:a"].engine_seconds > 0


@pytest.mark.parametrize("cap", [1, 2])
def test_a_cap_bounds_trainings_across_jobs(cap):
    training.limit_trainings(cap)
    ctx, train = SimpleNamespace(cost={}), CountingTrain()
    out = _jobs(ctx, train, ["a", "b", "c"], 2)
    assert out == [{"a": "info-a", "b": "info-b", "c": "info-c"}] * 2
    assert train.peak == cap  # one spec per slot, never more than the cap together
    assert all(len(c) == 1 for c in train.calls) and len(train.calls) == 6
    assert {k: v.calls for k, v in ctx.cost.items()} == {"train:a": 2, "train:b": 2,
                                                         "train:c": 2}


def test_bad_cap_is_refused():
    with pytest.raises(ValueError, match=">= 1"):
        training.limit_trainings(0)
