"""Single model: one model of the pool answers alone; the baseline every collaboration is
measured against (MoCo `single_model.py`)."""
from __future__ import annotations

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields
from moco_ray.tasks.base import DevSplit, Example


@register("single")
class Single(Strategy):
    level = "single"
    summary = "one model answers alone"

    class Params(SamplingFields):
        model: str | None = Field(None, description="pool model to ask (None: the job's first)")
        # Greedy by default: a single-model baseline should be deterministic.
        temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
        top_p: float = Field(1.0, gt=0.0, le=1.0)

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        # Nothing to tune; fail before the first example if the model is not in the job.
        self._model(ctx)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        p = self.params
        model = self._model(ctx.job)
        [gen] = await ctx.generate(model, ctx.task.prompt(example), p.sampling(ctx.task, ctx.rng),
                                   step="answer")
        return Answer(output=gen.text, meta={"model": model})

    def _model(self, ctx: StrategyContext) -> str:
        model = self.params.model or ctx.models[0]
        if model not in ctx.models:
            raise ValueError(f"params.model={model!r} is not among this job's models "
                             f"{ctx.models}; pick one of those")
        return model
