"""Helpers shared by several text-level strategies: prompt surgery, answer extraction, and the
"best single model on dev" choice most MoCo text methods make for their final-answer model.
(The leading underscore keeps this module out of the registry's way; it registers nothing.)
"""
from __future__ import annotations

import asyncio

from moco_ray.records import ChatMessage, Prompt
from moco_ray.strategies.base import ExampleContext, Strategy, StrategyContext
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example, Task


def user_text(prompt: Prompt) -> str:
    """The last user message: the question as the task formats it, answer format included."""
    if isinstance(prompt, str):
        return prompt
    for m in reversed(prompt):
        if m.get("role") == "user":
            return m["content"]
    raise ValueError(f"task prompt has no user message to build on: {prompt!r}")


def with_user_text(prompt: Prompt, text: str) -> Prompt:
    """`prompt` with its last user message replaced by `text`; system messages are kept, so the
    task's answer-format instructions still reach the model."""
    if isinstance(prompt, str):
        return text
    i = max(k for k, m in enumerate(prompt) if m.get("role") == "user")
    return [*prompt[:i], {**prompt[i], "content": text}, *prompt[i + 1:]]


def plain(text: str) -> list[ChatMessage]:
    """A side request (feedback, knowledge, judging): one user message, no task system prompt."""
    return [{"role": "user", "content": text}]


def listing(texts: list[str], label: str = "") -> str:
    """Numbered, not named: models should weigh the content, not the source."""
    return "\n".join(f"[{label}{i + 1}] {t.strip()}" for i, t in enumerate(texts)) or "(none)"


def answer_of(task: Task, text: str, example: Example) -> str:
    """The task's extracted answer, stripped; '' when nothing could be extracted."""
    return (task.extract(text, example) or "").strip()


async def generate_all(ctx: ExampleContext, p: SamplingFields, jobs: list[tuple[str, Prompt]],
                       step: str) -> list[str]:
    """One call per (model, prompt), all in flight at once; texts in job order. Seeds are drawn
    up front, in job order, so results do not depend on scheduling."""
    params = [p.sampling(ctx.task, ctx.rng) for _ in jobs]
    gens = await asyncio.gather(*(ctx.generate(m, prompt, sp, step=step)
                                  for (m, prompt), sp in zip(jobs, params)))
    return [g.text for [g] in gens]


def check_model(name: str, allowed: list[str], field: str) -> str:
    if name not in allowed:
        raise ValueError(f"params.{field}={name!r} is not among the models {allowed}; "
                         "pick one of those")
    return name


async def dev_accuracy(ctx: StrategyContext, dev: DevSplit, p: SamplingFields,
                       limit: int | None) -> dict[str, float]:
    """Each model answers the first `limit` dev examples alone; mean task score per model."""

    async def one(ectx: ExampleContext, ex: Example) -> list[float]:
        prompt = ctx.task.prompt(ex)
        params = [p.sampling(ctx.task, ectx.rng) for _ in ctx.models]
        gens = await asyncio.gather(*(ectx.generate(m, prompt, sp, step="dev_answer")
                                      for m, sp in zip(ctx.models, params)))
        return [ctx.task.score(g.text, ex) for [g] in gens]

    rows = await over_dev(ctx, dev, limit, one)
    return {m: sum(r[i] for r in rows) / len(rows) for i, m in enumerate(ctx.models)}


async def choose_model(strategy: Strategy, ctx: StrategyContext, dev: DevSplit,
                       fixed: str | None, field: str, limit: int | None) -> None:
    """Set `strategy.fitted[field]`: the model named in params (checked), else the job's model
    with the best dev accuracy (first in job order on ties), as the MoCo reference does."""
    if fixed is not None:
        strategy.fitted[field] = check_model(fixed, ctx.models, field)
        return
    acc = await dev_accuracy(ctx, dev, strategy.params, limit)
    strategy.fitted["dev_accuracy"] = acc
    strategy.fitted[field] = max(ctx.models, key=acc.__getitem__)


def fitted_model(strategy: Strategy, field: str) -> str:
    model = strategy.fitted.get(field)
    if model is None:
        raise RuntimeError(f"{strategy.name} needs fit(dev) to choose its {field} (the best "
                           f"single model on dev), or params.{field}=<model>")
    return model
