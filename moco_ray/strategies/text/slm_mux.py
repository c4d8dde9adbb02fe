"""SLM-MUX: each model answers several times; a model's confidence on a question is how
consistent its own samples are (the share of its samples that give its most frequent answer);
the most confident model wins and its majority answer is the output. Ties between models go to
the better model on dev. Unlike a majority vote over all samples, a model's answers never mix
with another's. SLM-MUX (Wang et al., "SLM-MUX: Orchestrating Small Language Models for
Reasoning", ICLR 2026); MoCo `text_slm_mux.py`, whose defaults these are: 5 samples per model,
dev-based tie-break. The reference divides by the number of samples with an extractable answer;
here by all samples, as the paper defines it, so a model that often gives no answer is less
confident, not more.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Literal

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import MultiSampleFields
from moco_ray.strategies.text._shared import answer_of, dev_accuracy
from moco_ray.tasks.base import DevSplit, Example


@register("text_slm_mux")
class SLMMux(Strategy):
    level = "text"
    summary = "the model whose own samples agree most answers with its majority answer"

    class Params(MultiSampleFields):
        samples_per_model: int = Field(5, ge=1, description="samples per model (reference: 5)")
        tie_break: Literal["dev_best", "model_order", "random"] = Field(
            "dev_best", description="among equally confident models: best dev accuracy "
                                    "(reference), job order, or seeded random")
        dev_size: int | None = Field(None, ge=1, description="dev examples for 'dev_best' "
                                                              "(None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        if self.params.tie_break == "dev_best":
            self.fitted["dev_accuracy"] = await dev_accuracy(ctx, dev, self.params,
                                                             self.params.dev_size)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        p, models = self.params, ctx.models
        prompt = ctx.task.prompt(example)
        # Every sample is its own call with its own seed (one seed for k copies would give k
        # identical samples); seeds are drawn up front, in model order.
        calls = [(m, p.sampling(ctx.task, ctx.rng)) for m in models
                 for _ in range(p.samples_per_model)]
        gens = await asyncio.gather(*(ctx.generate(m, prompt, sp, step="sample")
                                      for m, sp in calls))
        texts = {m: [] for m in models}
        for (m, _), [g] in zip(calls, gens):
            texts[m].append(g.text)
        picks, confidence = {}, {}
        for m in models:
            counts = Counter(a for a in (answer_of(ctx.task, t, example) for t in texts[m]) if a)
            if not counts:
                picks[m], confidence[m] = "", 0.0
                continue
            top = max(counts.values())
            # A model split evenly between answers picks one at random (seeded), as the reference.
            picks[m] = ctx.rng.choice(sorted(a for a, c in counts.items() if c == top))
            confidence[m] = top / p.samples_per_model
        best = max(confidence.values())
        tied = [m for m in models if confidence[m] == best]
        winner = tied[0] if len(tied) == 1 else self._tie_break(ctx, tied)
        answer = picks[winner]
        output = next((t for t in texts[winner] if answer_of(ctx.task, t, example) == answer),
                      texts[winner][0])
        return Answer(output=output, meta={
            "winner": winner, "answer": answer, "confidence": confidence, "answers": picks,
            "tie": len(tied) > 1})

    def _tie_break(self, ctx: ExampleContext, tied: list[str]) -> str:
        rule = self.params.tie_break
        if rule == "model_order":
            return tied[0]
        if rule == "random":
            return ctx.rng.choice(tied)
        acc = self.fitted.get("dev_accuracy")
        if acc is None:
            raise RuntimeError("text_slm_mux with tie_break='dev_best' needs fit(dev) first: it "
                               "measures each model's dev accuracy")
        return max(tied, key=acc.__getitem__)  # first in job order on equal accuracy
