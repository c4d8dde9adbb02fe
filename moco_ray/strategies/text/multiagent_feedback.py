"""Multiagent feedback: every model answers; then, each round, a few other models give feedback
on each model's latest answer and the author revises it with that feedback; the best single model
on dev summarizes the last answers. In the line of Self-Refine (Madaan et al., 2023) with peer
instead of self feedback, and multi-agent critique (Du et al., 2023); MoCo
`text_multiagent_feedback.py`, whose defaults these are: 3 rounds (the first answers alone),
up to 3 reviewers per answer drawn at random from the other models, summarizer = best on dev.
"""
from __future__ import annotations

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields
from moco_ray.strategies.text._shared import (
    choose_model,
    fitted_model,
    generate_all,
    listing,
    plain,
    user_text,
    with_user_text,
)
from moco_ray.tasks.base import DevSplit, Example

FEEDBACK = (
    "You are part of a team of AI assistants answering a user's question together. Below is one "
    "assistant's answer. Give constructive feedback that would help improve it: point out "
    "errors and gaps, and say how to fix them.\n\nQuestion:\n{question}\n\n"
    "Assistant's answer:\n{answer}\n\nYour feedback:"
)
REVISE = (
    "You are part of a team of AI assistants answering a user's question together. Below are "
    "your previous answer and feedback on it from other assistants. Use the feedback to improve "
    "your answer.\n\nQuestion:\n{question}\n\nYour previous answer:\n{own}\n\n"
    "Feedback from other assistants:\n{feedback}\n\n"
    "Give your improved answer to the question, in the format the question asks for."
)
SUMMARIZE = (
    "You are part of a team of AI assistants answering a user's question together. Each "
    "assistant gave its own answer; use them to write one final answer.\n\n"
    "Question:\n{question}\n\nAssistants' answers:\n{answers}\n\n"
    "Give the final answer to the question, in the format the question asks for."
)


@register("text_multiagent_feedback")
class MultiagentFeedback(Strategy):
    level = "text"
    summary = "models critique each other's answers over rounds, authors revise; one summarizes"

    class Params(SamplingFields):
        rounds: int = Field(3, ge=1, description="answer rounds: the first answers alone, each "
                                                 "later one gathers feedback and revises "
                                                 "(reference: 3)")
        feedback_count: int = Field(3, ge=1, description="reviewers per answer, drawn at random "
                                                         "among the other models (at most all "
                                                         "of them; reference: 3)")
        summarizer: str | None = Field(None, description="fixed summarizer; None: the best "
                                                         "single model on dev (reference)")
        dev_size: int | None = Field(None, ge=1, description="dev examples to choose the "
                                                              "summarizer on (None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        await choose_model(self, ctx, dev, p.summarizer, "summarizer", p.dev_size)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        summarizer = fitted_model(self, "summarizer")
        p, models = self.params, ctx.models
        if p.rounds > 1 and len(models) < 2:
            raise ValueError(f"text_multiagent_feedback needs at least 2 models to exchange "
                             f"feedback, the job has {models}; add models or set rounds=1")
        base = ctx.task.prompt(example)
        question = user_text(base)
        answers = dict(zip(models, await generate_all(ctx, p, [(m, base) for m in models],
                                                      "round0")))
        history, reviews = [answers], []
        for r in range(1, p.rounds):
            # Reviewers are drawn up front, in model order, so seeds do not depend on scheduling.
            k = min(p.feedback_count, len(models) - 1)
            reviewers = {m: ctx.rng.sample([o for o in models if o != m], k) for m in models}
            jobs = [(rv, plain(FEEDBACK.format(question=question, answer=answers[m])))
                    for m in models for rv in reviewers[m]]
            texts = iter(await generate_all(ctx, p, jobs, f"feedback{r}"))
            feedback = {m: [next(texts) for _ in reviewers[m]] for m in models}
            revise = [(m, with_user_text(base, REVISE.format(
                question=question, own=answers[m], feedback=listing(feedback[m]))))
                for m in models]
            answers = dict(zip(models, await generate_all(ctx, p, revise, f"round{r}")))
            history.append(answers)
            reviews.append({m: dict(zip(reviewers[m], feedback[m])) for m in models})
        prompt = with_user_text(base, SUMMARIZE.format(
            question=question, answers=listing([answers[m] for m in models])))
        [final] = await generate_all(ctx, p, [(summarizer, prompt)], "summarize")
        return Answer(output=final, meta={"summarizer": summarizer, "rounds": history,
                                          "feedback": reviews})
