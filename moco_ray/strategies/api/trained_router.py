"""Trained router: every model answers each dev question; the model with the best task score
becomes that question's label, and a LoRA router is trained (SFT, our Ray Train + DeepSpeed
trainer) to map the question to "Model k". At test time the router scores each label for the
question and the chosen model answers. MoCo `api_trained_router.py` (a RouteLLM-style learned
router; Ong et al., 2024).

Reference defaults kept: the router prompt (with model descriptions when given), labels
"Model 1".."Model N", dev answers sampled at temperature 0.7 / top-p 0.9. Departures:
- the router is an adapter over a pool model (`router_model`, default the job's first model,
  served with `enable_lora`), not a separate Qwen2.5-7B; adapter settings are small and
  CPU-sized (the reference: LoRA r=64, alpha 16, lr 1e-5, 5 epochs);
- a tie on the task metric goes to the job's first tied model (`tie_break='first'`: list
  cheaper models first) or to the shorter answer ('fewer_tokens'), not to a reward model;
- questions where every model scores the same teach nothing and are left out; when no question
  is left, or all labels name one model, no router is trained and that model (else the best
  model on dev) answers everything;
- the router's choice is the label it finds most likely (`score`), not a parsed generation, so
  it always names a valid model (the reference fell back to a random model);
- the router prompt is one chat user turn both in training and when the router scores the
  labels (`_prompt`, used by both). The reference trains TRL prompt/completion rows on the raw
  text but queries the trained router through the chat template.
"""
from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field

from moco_ray.records import Prompt
from moco_ray.strategies.api._patches import (
    AdapterFields,
    chat_row,
    check_model,
    label_prompt,
    labels,
    pick_label,
    question_of,
    train_one,
)
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example

INTRO = "You are an AI assistant tasked with choosing the best model to answer the user's question"


def router_prompt(question: str, n: int, descriptions: list[str] | None) -> str:
    """The reference's router prompt: the question (and model descriptions), then the ask."""
    if descriptions:
        listing = "".join(f"- Model {i + 1}: {d}\n" for i, d in enumerate(descriptions))
        return (f"{INTRO} based on the model descriptions.\n\nModel Descriptions:\n{listing}\n"
                f"Question: {question}\n\nBased on the model descriptions, choose the best "
                f"model (1-{n}) to answer the question.")
    return (f"{INTRO}.\n\nQuestion: {question}\n\nBased on your knowledge, choose the best model "
            f"(1-{n}) to answer the question.")


def best_index(scores: list[float], tokens: list[int], tie_break: str) -> int:
    """The label of one dev question: the highest task score; ties by `tie_break`."""
    top = max(scores)
    tied = [i for i, s in enumerate(scores) if s == top]
    if tie_break == "fewer_tokens":
        return min(tied, key=lambda i: (tokens[i], i))
    return tied[0]


@register("api_trained_router")
class TrainedRouter(Strategy):
    level = "api"
    summary = "a LoRA router trained on dev (best model per question) picks who answers"

    class Params(SamplingFields, AdapterFields):
        router_model: str | None = Field(None, description="pool model the router adapter is "
                                                           "trained over (None: the first)")
        model_descriptions: list[str] | None = Field(
            None, description="one per job model, in order, shown in the router prompt")
        tie_break: Literal["first", "fewer_tokens"] = Field(
            "first", description="label of a question several models get equally right")
        dev_size: int | None = Field(None, ge=1, description="dev questions to learn from "
                                                             "(None: all)")

    def _prompt(self, prompt: Prompt, n: int) -> Prompt:
        """The router's input for a task prompt, the same in its SFT rows and when it scores."""
        return label_prompt(router_prompt(question_of(prompt), n, self.params.model_descriptions))

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, models = self.params, ctx.models
        if p.model_descriptions is not None and len(p.model_descriptions) != len(models):
            raise ValueError(f"params.model_descriptions has {len(p.model_descriptions)} entries "
                             f"for {len(models)} models {models}; give one per model, in order")
        router = check_model(p.router_model, "router_model", models, models[0])

        async def one(ectx: ExampleContext, ex: Example) -> tuple[Prompt, list[float], list[int]]:
            prompt = ctx.task.prompt(ex)
            gens = await asyncio.gather(*(
                ectx.generate(m, prompt, p.sampling(ctx.task, ectx.rng), step="dev_answer")
                for m in models))
            return (prompt, [ctx.task.score(g.text, ex) for [g] in gens],
                    [g.completion_tokens for [g] in gens])

        dev_rows = await over_dev(ctx, dev, p.dev_size, one)
        acc = {m: sum(r[1][i] for r in dev_rows) / len(dev_rows) for i, m in enumerate(models)}
        best = max(models, key=lambda m: acc[m])  # ties: the job's order
        names = labels(len(models), "Model {}", start=1)
        dev_labels = [best_index(s, t, p.tie_break) for _, s, t in dev_rows]
        rows = [chat_row(self._prompt(prompt, len(models)), names[k])
                for (prompt, s, _), k in zip(dev_rows, dev_labels) if max(s) > min(s)]
        taught = {k for (_, s, _), k in zip(dev_rows, dev_labels) if max(s) > min(s)}
        self.fitted.update(router=router, best=best, dev_accuracy=acc, labels=dev_labels,
                           train_rows=len(rows), adapter=None)
        if not taught:
            self.fitted.update(fallback=best, reason="no dev question separates the models")
        elif len(taught) == 1:
            self.fitted.update(fallback=models[taught.pop()],
                               reason="every informative dev question names one model")
        else:
            self.fitted["adapter"] = await train_one(ctx, "router", router, rows, p)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "router" not in self.fitted:
            raise RuntimeError("api_trained_router needs fit(dev) first: it trains the router "
                               "on dev")
        p, models = self.params, ctx.models
        prompt = ctx.task.prompt(example)
        meta: dict = {"router": self.fitted["router"]}
        if self.fitted["adapter"] is None:
            chosen = self.fitted["fallback"]
            meta["fallback"] = self.fitted["reason"]
        else:
            k, sums = await pick_label(ctx, self.fitted["router"], self._prompt(prompt, len(models)),
                                       labels(len(models), "Model {}", start=1),
                                       self.fitted["adapter"], step="route")
            chosen = models[k]
            meta["label_logprobs"] = dict(zip(models, sums))
        [gen] = await ctx.generate(chosen, prompt, p.sampling(ctx.task, ctx.rng), step="answer")
        return Answer(output=gen.text, meta={**meta, "routed_to": chosen})
