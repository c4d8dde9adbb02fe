"""Logit contrastive: rank the models by dev accuracy, then decode from the best model's
log-probs pushed away from the worst models' and toward the other top ones:
    scores = top_1 + lambda * (sum of the top-k - sum of the bottom-k).
Contrastive decoding (Li et al., 2023, "Contrastive Decoding: Open-ended Text Generation as
Optimization") with dev-ranked experts and amateurs; MoCo `logit_logit_contrastive.py`, whose
defaults these are (k 1, lambda 0.2; sampling at the config temperature, no top-p).

With k = 1 that is (1 + lambda) * expert - lambda * amateur. The combination runs in the logit
group's lockstep decoder as the 'contrastive' combine (a signed weighted sum of log-probs, which
equals the reference's sum of raw logits up to a per-step constant, so the same distribution).
Weights are one per job model, in the job's order (the logit group's members, in its order);
models neither top-k nor bottom-k get weight 0.
"""
from __future__ import annotations

import asyncio

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example


@register("logit_logit_contrastive")
class LogitContrastive(Strategy):
    level = "logit"
    summary = "decode from the best dev model's log-probs contrasted with the worst's"

    class Params(SamplingFields):
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        k: int = Field(1, ge=1, description="how many top (expert) and bottom (amateur) models")
        lambda_: float = Field(0.2, gt=0.0, description="scale of the summed contrast")
        dev_size: int | None = Field(None, ge=1, description="dev examples to rank the models "
                                                             "on (None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, models = self.params, ctx.models
        if 2 * p.k > len(models):
            raise ValueError(f"k={p.k} needs at least {2 * p.k} models (k experts and k "
                             f"amateurs, disjoint); the job has {len(models)}: lower k")

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            prompt = ctx.task.prompt(ex)
            gens = await asyncio.gather(*(
                ectx.generate(m, prompt, p.sampling(ctx.task, ectx.rng), step="dev_answer")
                for m in models))
            return [ctx.task.score(g.text, ex) for [g] in gens]

        rows = await over_dev(ctx, dev, p.dev_size, one)
        acc = [sum(r[i] for r in rows) / len(rows) for i in range(len(models))]
        # best first; equal accuracy keeps the job's order (a stable sort)
        ranked = sorted(range(len(models)), key=lambda i: -acc[i])
        self.fitted.update(weights=contrast_weights(ranked, len(models), p.k, p.lambda_),
                           experts=[models[i] for i in ranked[:p.k]],
                           amateurs=[models[i] for i in ranked[-p.k:]],
                           dev_accuracy=dict(zip(models, acc)))

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "weights" not in self.fitted:
            raise RuntimeError("logit_logit_contrastive needs fit(dev) first: it ranks the "
                               "models on dev to pick experts and amateurs")
        w = self.fitted["weights"]
        gen = await ctx.fused_generate(ctx.task.prompt(example),
                                       self.params.sampling(ctx.task, ctx.rng), "contrastive", w,
                                       step="contrastive")
        return Answer(output=gen.text, meta={"weights": w, "experts": self.fitted["experts"],
                                             "amateurs": self.fitted["amateurs"]})


def contrast_weights(ranked: list[int], n: int, k: int, lam: float) -> list[float]:
    """Per-model weights of top_1 + lam * (sum top-k - sum bottom-k); `ranked` is best first."""
    w = [0.0] * n
    w[ranked[0]] += 1.0
    for i in ranked[:k]:
        w[i] += lam
    for i in ranked[-k:]:
        w[i] -= lam
    return w
