"""Prompt routing: the model with the best dev accuracy becomes the router; for each question it
is shown the candidate models' descriptions and asked which model should answer ("Respond with
the model number only"); the chosen model answers. MoCo `api_prompt_routing.py`.

The reference requires hand-written `model_descriptions`. Here they are optional: without them
each model is described from dev, by its accuracy and a few dev questions it answered correctly
where some other model failed (its strengths), so the router has something question-specific to
go on. A reply naming no valid model number falls back to the best dev model, as in the
reference; the reply's first number in range counts (the reference took the highest digit that
appeared anywhere, so "1" matched inside "10").
"""
from __future__ import annotations

import asyncio
import re

from pydantic import Field

from moco_ray.records import Prompt
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example

ROUTER_PROMPT = (
    "You are an AI assistant that routes user questions to the most suitable AI model based on "
    "their descriptions.\n\nUser question: {question}\n\nModel descriptions:\n{models}\n"
    "Based on the above descriptions, which model is best suited to answer the user's question? "
    "Respond with the model number only.")


@register("api_prompt_routing")
class PromptRouting(Strategy):
    level = "api"
    summary = "the best dev model reads model descriptions and picks who answers each question"

    class Params(SamplingFields):
        model_descriptions: list[str] | None = Field(
            None, description="one per job model, in order (None: described from dev)")
        router: str | None = Field(None, description="router model (None: the best on dev)")
        strengths_per_model: int = Field(2, ge=0, description="dev questions quoted per model "
                                                              "in generated descriptions")
        dev_size: int | None = Field(None, ge=1, description="dev examples to evaluate on "
                                                             "(None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, models = self.params, ctx.models
        if p.model_descriptions is not None and len(p.model_descriptions) != len(models):
            raise ValueError(f"params.model_descriptions has {len(p.model_descriptions)} entries "
                             f"for {len(models)} models {models}; give one per model, in order")
        if p.router is not None and p.router not in models:
            raise ValueError(f"params.router={p.router!r} is not among this job's models {models}")

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            prompt = ctx.task.prompt(ex)
            gens = await asyncio.gather(*(
                ectx.generate(m, prompt, p.sampling(ctx.task, ectx.rng), step="dev_answer")
                for m in models))
            return [ctx.task.score(g.text, ex) for [g] in gens]

        examples = dev.examples[:p.dev_size] if p.dev_size else dev.examples
        rows = await over_dev(ctx, dev, p.dev_size, one)
        acc = {m: sum(r[i] for r in rows) / len(rows) for i, m in enumerate(models)}
        best = max(models, key=lambda m: acc[m])  # ties: the job's order
        descriptions = list(p.model_descriptions or [])
        if not descriptions:
            for i, m in enumerate(models):
                strengths = [question_text(ctx.task.prompt(ex)) for ex, r in zip(examples, rows)
                             if r[i] > 0 and min(r) < r[i]][:p.strengths_per_model]
                descriptions.append(describe(acc[m], len(rows), strengths))
        self.fitted.update(router=p.router or best, best=best, dev_accuracy=acc,
                           descriptions=descriptions)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "router" not in self.fitted:
            raise RuntimeError("api_prompt_routing needs fit(dev) first: it picks the router "
                               "(and describes the models) on dev")
        p, models = self.params, ctx.models
        listing = "".join(f"- {i + 1}: {d}\n" for i, d in enumerate(self.fitted["descriptions"]))
        prompt = ctx.task.prompt(example)
        ask = ROUTER_PROMPT.format(question=question_text(prompt), models=listing)
        router = self.fitted["router"]
        [reply] = await ctx.generate(router, ask, p.sampling(ctx.task, ctx.rng), step="route")
        pick = parse_choice(reply.text, len(models))
        chosen = models[pick] if pick is not None else self.fitted["best"]
        [gen] = await ctx.generate(chosen, prompt, p.sampling(ctx.task, ctx.rng), step="answer")
        return Answer(output=gen.text, meta={"router": router, "routed_to": chosen,
                                             "router_reply": reply.text,
                                             "fallback": pick is None})


def parse_choice(reply: str, n: int) -> int | None:
    """Index of the first model number 1..n in the reply, None if there is none."""
    for tok in re.findall(r"\d+", reply):
        if 1 <= int(tok) <= n:
            return int(tok) - 1
    return None


def question_text(prompt: Prompt) -> str:
    """The question as the user wrote it: the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else "\n".join(m["content"] for m in prompt)


def describe(accuracy: float, n: int, strengths: list[str]) -> str:
    text = f"answered {accuracy:.0%} of {n} questions of this task correctly."
    if strengths:
        quoted = "; ".join(f'"{s[:200]}"' for s in strengths)
        text += f" It got these right where other models failed: {quoted}."
    return text
