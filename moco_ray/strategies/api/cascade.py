"""Cascade: models from weak to strong; each answers with a confidence (its mean token logprob)
and the answer stands if the confidence reaches that model's threshold, else the next model
tries; the last model always answers. FrugalGPT (Chen et al., 2023) and token-level uncertainty
cascades (Gupta et al., 2024); MoCo `api_cascade.py`, `logit` mode.

Thresholds are learned on dev for each model from its *own* confidences (the reference computed
every model's threshold from model 0's generations). Two rules:
- 'quantile' (the reference's, default): threshold = the `percentage` quantile of the model's dev
  confidences, so with 0.5 each model keeps its more confident half and defers the rest.
- 'max_accuracy': backward induction from the strongest model: each model's threshold maximises
  the dev accuracy of the cascade from that model on (given the thresholds after it); among
  equally good thresholds the lowest wins, since answering early is cheaper.
"""
from __future__ import annotations

import asyncio
import math
from typing import Literal

from pydantic import Field

from moco_ray.records import Generation
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example


@register("api_cascade")
class Cascade(Strategy):
    level = "api"
    summary = "weak to strong; a model's answer stands if its confidence reaches its threshold"

    class Params(SamplingFields):
        threshold_rule: Literal["quantile", "max_accuracy"] = Field(
            "quantile", description="how each model's threshold is set on dev (module docstring)")
        percentage: float = Field(0.5, ge=0.0, le=1.0, description="quantile of a model's dev "
                                                                   "confidences ('quantile' rule)")
        order: Literal["given", "dev_accuracy"] = Field(
            "given", description="weak-to-strong order: the job's model order, or ascending "
                                 "dev accuracy")
        dev_size: int | None = Field(None, ge=1, description="dev examples to learn on (None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params

        async def one(ectx: ExampleContext, ex: Example) -> list[tuple[float, float]]:
            prompt = ctx.task.prompt(ex)
            params = [p.sampling(ctx.task, ectx.rng, logprobs=1) for _ in ctx.models]
            gens = await asyncio.gather(*(ectx.generate(m, prompt, sp, step="dev_answer")
                                          for m, sp in zip(ctx.models, params)))
            return [(_confidence(g, m), ctx.task.score(g.text, ex))
                    for m, [g] in zip(ctx.models, gens)]

        rows = await over_dev(ctx, dev, p.dev_size, one)
        conf = {m: [r[i][0] for r in rows] for i, m in enumerate(ctx.models)}
        correct = {m: [r[i][1] for r in rows] for i, m in enumerate(ctx.models)}
        acc = {m: sum(v) / len(v) for m, v in correct.items()}
        order = list(ctx.models)
        if p.order == "dev_accuracy":
            order.sort(key=lambda m: acc[m])  # stable: ties keep the job's order
        thresholds: dict[str, float] = {}
        if p.threshold_rule == "quantile":
            for m in order[:-1]:
                thresholds[m] = _quantile(conf[m], p.percentage)
        else:
            value = correct[order[-1]]
            for m in reversed(order[:-1]):
                thresholds[m], value = _best_threshold(conf[m], correct[m], value)
        self.fitted.update(order=order, thresholds=thresholds, dev_accuracy=acc,
                           dev_cascade_accuracy=_simulate(order, thresholds, conf, correct))

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "thresholds" not in self.fitted:
            raise RuntimeError("api_cascade needs fit(dev) first: it learns each model's "
                               "confidence threshold on dev")
        order, thresholds = self.fitted["order"], self.fitted["thresholds"]
        prompt = ctx.task.prompt(example)
        confidences: dict[str, float] = {}
        for i, m in enumerate(order):
            params = self.params.sampling(ctx.task, ctx.rng, logprobs=1)
            [g] = await ctx.generate(m, prompt, params, step=f"level{i}")
            confidences[m] = _confidence(g, m)
            c = confidences[m]
            if i == len(order) - 1 or (c > -math.inf and c >= thresholds[m]):
                return Answer(output=g.text, meta={"answered_by": m, "level": i,
                                                   "confidences": confidences,
                                                   "thresholds": thresholds})
        raise AssertionError("unreachable: the last model always answers")


def _confidence(g: Generation, model: str) -> float:
    """Mean token logprob; an empty answer has no confidence at all (-inf: always defer)."""
    if g.logprobs is None and g.completion_tokens > 0:
        raise RuntimeError(f"model {model!r} returned no logprobs although logprobs=1 was "
                           "asked; api_cascade needs an engine that reports token logprobs")
    mean = g.mean_logprob
    return -math.inf if mean is None else mean


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's and torch's default), tolerant of -inf."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    if lo == hi or frac == 0.0:
        return s[lo]
    if math.isinf(s[lo]):
        return s[hi] if frac == 1.0 else s[lo]
    return s[lo] + (s[hi] - s[lo]) * frac


def _best_threshold(conf: list[float], correct: list[float],
                    after: list[float]) -> tuple[float, list[float]]:
    """Threshold maximising sum(correct if conf >= t else after); lowest t on ties. Returns it
    and the per-example outcome of the cascade from this model on."""
    best_t, best = math.inf, sum(after)  # inf: defer everything
    for t in sorted(set(conf), reverse=True):  # descending, so a tie moves to the lower t
        total = sum(s if c >= t else a for c, s, a in zip(conf, correct, after))
        if total >= best:
            best_t, best = t, total
    return best_t, [s if c >= best_t else a for c, s, a in zip(conf, correct, after)]


def _simulate(order: list[str], thresholds: dict[str, float], conf: dict[str, list[float]],
              correct: dict[str, list[float]]) -> float:
    """Dev accuracy of the cascade with these thresholds."""
    n, total = len(correct[order[0]]), 0.0
    for k in range(n):
        m = next((m for m in order[:-1] if conf[m][k] >= thresholds[m]), order[-1])
        total += correct[m][k]
    return total / n
