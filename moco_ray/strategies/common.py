"""Helpers shared by several strategies: the sampling fields of a Params model, dev passes."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import Field, model_validator

from moco_ray.records import SamplingParams
from moco_ray.strategies.base import ExampleContext, Strategy, StrategyContext
from moco_ray.tasks.base import DevSplit, Example, Task

T = TypeVar("T")
# Examples of a dev pass in flight at once (fit has no job concurrency setting of its own).
DEV_CONCURRENCY = 16


class SamplingFields(Strategy.Params):
    """Sampling fields most strategies take. The defaults are the MoCo reference's general
    hyperparameters (temperature 0.7, top_p 0.9); `max_tokens` None means the task's own."""

    max_tokens: int | None = Field(None, ge=1, description="new tokens per call (None: task's)")
    temperature: float = Field(0.7, ge=0.0, description="passed to the engine as is; 0 = greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0)

    def sampling(self, task: Task, rng: random.Random | None = None,
                 logprobs: int | None = None) -> SamplingParams:
        """SamplingParams for one call. With temperature > 0, a seed drawn from `rng` (the
        example's seeded RNG) makes each call reproducible and distinct from its siblings."""
        seed = rng.randrange(2**31) if rng is not None and self.temperature > 0 else None
        return SamplingParams(max_tokens=self.max_tokens or task.max_tokens,
                              temperature=self.temperature, top_p=self.top_p, seed=seed,
                              logprobs=logprobs)


class MultiSampleFields(SamplingFields):
    """SamplingFields plus `samples_per_model` (subclasses set its default), refusing several
    greedy samples: at temperature 0 they would all be the same."""

    samples_per_model: int = Field(1, ge=1, description="sampled answers per model")

    @model_validator(mode="after")
    def _samples_need_sampling(self):
        if self.samples_per_model > 1 and self.temperature == 0:
            raise ValueError(f"samples_per_model={self.samples_per_model} with temperature=0 "
                             "gives identical samples; set temperature > 0")
        return self


async def over_dev(ctx: StrategyContext, dev: DevSplit, limit: int | None,
                   fn: Callable[[ExampleContext, Example], Awaitable[T]]) -> list[T]:
    """Run `fn` on the first `limit` dev examples (all when None), each in its own
    ExampleContext so its calls count in the job's cost; results in dev order."""
    examples = dev.examples[:limit] if limit else dev.examples
    if not examples:
        raise ValueError(f"dev split of task {dev.task!r} is empty; this strategy tunes on dev")
    sem = asyncio.Semaphore(DEV_CONCURRENCY)

    async def one(ex: Example) -> T:
        async with sem:
            return await fn(ctx.example(ex), ex)

    return list(await asyncio.gather(*(one(ex) for ex in examples)))
