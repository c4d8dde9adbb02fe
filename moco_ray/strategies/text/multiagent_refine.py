"""Multiagent refine (debate): every model answers, then for a few rounds each model reads the
others' latest answers and revises its own; one summarizer model writes the final answer.
Multiagent Debate (Du et al., 2023) and Self-Refine (Madaan et al., 2023); MoCo
`text_multiagent_refine.py`. The reference picked the summarizer as the best single model on dev;
here it is the model whose *summaries* score best on (a small slice of) dev, which is the job it
is chosen for.
"""
from __future__ import annotations

import asyncio

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.strategies.text._shared import listing, user_text, with_user_text
from moco_ray.tasks.base import DevSplit, Example

REFINE = (
    "You are one of several assistants answering the same question together. Check your "
    "previous answer against the other assistants' answers and improve it.\n\n"
    "Question:\n{question}\n\nYour previous answer:\n{own}\n\n"
    "Other assistants' answers:\n{others}\n\n"
    "Give your refined answer to the question, in the format the question asks for."
)
SUMMARIZE = (
    "Several assistants answered the question below. Combine their answers into one final "
    "answer.\n\nQuestion:\n{question}\n\nAssistants' answers:\n{answers}\n\n"
    "Give the final answer to the question, in the format the question asks for."
)


@register("text_multiagent_refine")
class MultiagentRefine(Strategy):
    level = "text"
    summary = "models revise their answers over rounds of reading each other; one summarizes"

    class Params(SamplingFields):
        rounds: int = Field(3, ge=1, description="answer rounds: the first answers alone, "
                                                 "each later one revises (reference: 3)")
        summarizer: str | None = Field(None, description="fixed summarizer model; None: chosen "
                                                         "on dev in fit")
        summarizer_dev_size: int | None = Field(
            16, ge=1, description="dev examples used to choose the summarizer (None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        if p.summarizer is not None:
            if p.summarizer not in ctx.models:
                raise ValueError(f"params.summarizer={p.summarizer!r} is not among this job's "
                                 f"models {ctx.models}; pick one of those")
            self.fitted["summarizer"] = p.summarizer
            return

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            rounds = await self._debate(ectx, ex)
            outs = await asyncio.gather(*(self._summarize(ectx, ex, m, rounds[-1])
                                          for m in ctx.models))
            return [ctx.task.score(o, ex) for o in outs]

        rows = await over_dev(ctx, dev, p.summarizer_dev_size, one)
        scores = {m: sum(r[i] for r in rows) / len(rows) for i, m in enumerate(ctx.models)}
        self.fitted["summarizer_dev_scores"] = scores
        self.fitted["summarizer"] = max(ctx.models, key=scores.__getitem__)  # first on ties

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        summarizer = self.fitted.get("summarizer")
        if summarizer is None:
            raise RuntimeError("text_multiagent_refine needs fit(dev) to choose its summarizer, "
                               "or params.summarizer=<model>")
        rounds = await self._debate(ctx, example)
        final = await self._summarize(ctx, example, summarizer, rounds[-1])
        return Answer(output=final, meta={"summarizer": summarizer, "rounds": rounds})

    async def _debate(self, ctx: ExampleContext, example: Example) -> list[dict[str, str]]:
        """Every round's answers, model -> text; round r > 0 sees round r - 1."""
        p, base = self.params, ctx.task.prompt(example)
        question = user_text(base)
        history: list[dict[str, str]] = []
        for r in range(p.rounds):
            prompts = {m: base if r == 0 else with_user_text(base, REFINE.format(
                question=question, own=history[-1][m],
                others=listing([history[-1][o] for o in ctx.models if o != m])))
                for m in ctx.models}
            params = [p.sampling(ctx.task, ctx.rng) for _ in ctx.models]
            gens = await asyncio.gather(*(ctx.generate(m, prompts[m], sp, step=f"round{r}")
                                          for m, sp in zip(ctx.models, params)))
            history.append({m: g.text for m, [g] in zip(ctx.models, gens)})
        return history

    async def _summarize(self, ctx: ExampleContext, example: Example, model: str,
                         last: dict[str, str]) -> str:
        base = ctx.task.prompt(example)
        prompt = with_user_text(base, SUMMARIZE.format(
            question=user_text(base), answers=listing([last[m] for m in ctx.models])))
        [gen] = await ctx.generate(model, prompt, self.params.sampling(ctx.task, ctx.rng),
                                   step="summarize")
        return gen.text
