"""Logit fusion: the models of a logit group decode together, each next token drawn from the
weighted mean of their log-probabilities (a product of experts, as in model ensembling at
decoding time); MoCo `logit_logit_fusion.py`, whose 'average' mode (uniform weights) is the
default. Its unimplemented 'optimized' mode is here a grid search over the weight simplex on dev.

The pool's LogitGroup deployment runs the lockstep decoder (engines/lockstep.py) with KV caches
and attention masks. Weights are one per job model, in the job's model order, which must be the
logit group's members in the group's order.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Literal

from pydantic import Field, model_validator

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example


@register("logit_logit_fusion")
class LogitFusion(Strategy):
    level = "logit"
    summary = "decode from the weighted mean of the models' next-token log-probs"

    class Params(SamplingFields):
        # The reference samples at the config's temperature and applies no top-p.
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        mode: Literal["average", "optimized"] = Field(
            "average", description="'average': uniform (or the given) weights; 'optimized': "
                                   "grid search of the weights on dev")
        weights: list[float] | None = Field(None, description="fixed weights, one per model")
        grid_step: float = Field(0.25, gt=0.0, le=1.0, description="weight grid spacing "
                                                                   "('optimized')")
        dev_size: int = Field(16, ge=1, description="dev examples per weight candidate")

        @model_validator(mode="after")
        def _check(self):
            if self.weights is not None:
                if self.mode == "optimized":
                    raise ValueError("give either weights or mode='optimized', not both")
                if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                    raise ValueError(f"weights {self.weights} must be >= 0 with a positive sum")
            steps = 1.0 / self.grid_step
            if abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"grid_step={self.grid_step} must divide 1 (e.g. 0.5, 0.25, 0.1)")
            return self

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, n = self.params, len(ctx.models)
        if p.weights is not None and len(p.weights) != n:
            raise ValueError(f"params.weights has {len(p.weights)} values for {n} models "
                             f"{ctx.models}; give one per model")
        if p.mode != "optimized":
            return
        candidates = weight_grid(n, round(1.0 / p.grid_step))

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            prompt = ctx.task.prompt(ex)
            # One seed for every candidate: they differ only in weights (common random numbers).
            sp = p.sampling(ctx.task, ectx.rng)
            gens = await asyncio.gather(*(ectx.fused_generate(prompt, sp, "fusion", list(w),
                                                              step="dev_fused")
                                          for w in candidates))
            return [ctx.task.score(g.text, ex) for g in gens]

        rows = await over_dev(ctx, dev, p.dev_size, one)
        means = [sum(r[i] for r in rows) / len(rows) for i in range(len(candidates))]
        best = max(range(len(candidates)), key=lambda i: (means[i], -i))  # ties: earliest
        self.fitted["weights"] = list(candidates[best])
        self.fitted["dev_scores"] = {str(list(w)): s for w, s in zip(candidates, means)}

    def weights(self, n: int) -> list[float]:
        if "weights" in self.fitted:
            return self.fitted["weights"]
        if self.params.mode == "optimized":
            raise RuntimeError("mode='optimized' needs fit(dev) first: it tunes the weights on dev")
        return list(self.params.weights) if self.params.weights else [1.0 / n] * n

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        w = self.weights(len(ctx.models))
        gen = await ctx.fused_generate(ctx.task.prompt(example),
                                       self.params.sampling(ctx.task, ctx.rng), "fusion", w,
                                       step="fused")
        return Answer(output=gen.text, meta={"weights": w})


def weight_grid(n: int, parts: int) -> list[tuple[float, ...]]:
    """Uniform weights first, then every point of the simplex with coordinates k / parts."""
    uniform = tuple([1.0 / n] * n)
    grid = [tuple(k / parts for k in ks)
            for ks in itertools.product(range(parts + 1), repeat=n) if sum(ks) == parts]
    return [uniform] + [w for w in grid if w != uniform]
