"""A strategy that lives outside moco_ray: the job's first model answers alone.

A config names it by import path, e.g. `strategy: guide_pkg.skeleton_strategy:FirstModelAnswers`;
no `register` call is needed, and the module must import wherever the coordinator runs.
"""
from __future__ import annotations

from pydantic import Field

from moco_ray.records import SamplingParams
from moco_ray.strategies.base import Answer, ExampleContext, Strategy
from moco_ray.tasks.base import Example


class FirstModelAnswers(Strategy):
    name = "guide_first_model"
    level = "text"
    summary = "the job's first model answers alone"

    # Subclass Strategy.Params: frozen, and an unknown key is a config error, not ignored.
    class Params(Strategy.Params):
        max_tokens: int | None = Field(None, ge=1, description="new tokens (None: the task's)")

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        model = ctx.models[0]
        params = SamplingParams(max_tokens=self.params.max_tokens or ctx.task.max_tokens)
        # Through ctx, never the pool directly: the call becomes a Turn and counts in the cost.
        [gen] = await ctx.generate(model, ctx.task.prompt(example), params, step="answer")
        return Answer(output=gen.text, meta={"model": model})
