"""Majority vote: every model answers (optionally several sampled answers each) and the most
frequent extracted answer wins; self-consistency (Wang et al., 2023) across a pool of models.
MoCo `text_majority_vote.py`; its default tie-break is random, 'dev_best' trusts the voter with the
best dev accuracy.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Literal

from pydantic import Field

from moco_ray.records import Generation
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import MultiSampleFields, over_dev
from moco_ray.tasks.base import DevSplit, Example


@register("text_majority_vote")
class MajorityVote(Strategy):
    level = "text"
    summary = "each model answers; the most frequent extracted answer wins"

    class Params(MultiSampleFields):
        tie_break: Literal["random", "dev_best"] = Field(
            "random", description="'random' (seeded) or 'dev_best': the tied answer of the "
                                  "voter with the best dev accuracy")
        dev_size: int | None = Field(None, ge=1, description="dev examples for 'dev_best' "
                                                              "(None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        if self.params.tie_break != "dev_best":
            return
        p = self.params

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            prompt = ctx.task.prompt(ex)
            params = [p.sampling(ctx.task, ectx.rng) for _ in ctx.models]
            gens = await asyncio.gather(*(ectx.generate(m, prompt, sp, step="dev_answer")
                                          for m, sp in zip(ctx.models, params)))
            return [ctx.task.score(g.text, ex) for [g] in gens]

        rows = await over_dev(ctx, dev, p.dev_size, one)
        self.fitted["dev_accuracy"] = {m: sum(r[i] for r in rows) / len(rows)
                                       for i, m in enumerate(ctx.models)}

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        p = self.params
        prompt = ctx.task.prompt(example)
        # Seeds are drawn up front, in model order, so results do not depend on scheduling.
        calls = [(m, p.sampling(ctx.task, ctx.rng)) for m in ctx.models
                 for _ in range(p.samples_per_model)]
        gens: list[list[Generation]] = await asyncio.gather(
            *(ctx.generate(m, prompt, sp, step="vote") for m, sp in calls))
        votes = [(m, g.text, _answer(ctx, g.text, example)) for (m, _), [g] in zip(calls, gens)]
        counts = Counter(a for _, _, a in votes if a)  # an unparseable answer does not vote
        meta = {"votes": dict(counts),
                "answers": {m: [a for v, _, a in votes if v == m] for m in ctx.models}}
        if not counts:
            return Answer(output=votes[0][1], meta={**meta, "winner": None, "tie": False})
        top = max(counts.values())
        tied = sorted(a for a, c in counts.items() if c == top)
        voter = None
        if len(tied) == 1:
            winner = tied[0]
        elif p.tie_break == "random":
            winner = ctx.rng.choice(tied)
        else:
            voter = self._best_voter(ctx, votes, tied)
            winner = next(a for m, _, a in votes if m == voter and a in tied)
        output = next(t for m, t, a in votes if a == winner and voter in (None, m))
        return Answer(output=output, meta={**meta, "winner": winner, "tie": len(tied) > 1,
                                           "tie_voter": voter})

    def _best_voter(self, ctx: ExampleContext, votes, tied: list[str]) -> str:
        acc = self.fitted.get("dev_accuracy")
        if acc is None:
            raise RuntimeError("tie_break='dev_best' needs fit(dev) first: it measures each "
                               "model's dev accuracy")
        voters = [m for m in ctx.models if any(v == m and a in tied for v, _, a in votes)]
        return max(voters, key=acc.__getitem__)  # first in model order on ties


def _answer(ctx: ExampleContext, text: str, example: Example) -> str:
    return (ctx.task.extract(text, example) or "").strip()
