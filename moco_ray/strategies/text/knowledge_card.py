"""Knowledge Card: the pool's (specialised) models act as knowledge cards: each writes background
knowledge for the question; a relevance selector keeps the most relevant cards; the main model
answers with the selected knowledge in its prompt. Knowledge Card (Feng et al., ICLR 2024);
MoCo `text_knowledge_card.py`.

The MoCo reference keeps every card (and the main model's own, `exclude_self=False`) and picks
the main model as the best single model on dev; those are the defaults here. The paper's
relevance selector ranks cards by similarity to the question and keeps the top k; with no encoder
in the pool, relevance here is the main model's log-likelihood of "Yes" minus "No" when asked
whether the card is relevant (`ctx.score`), used when `top_k` is set. The paper's pruning and
factuality selectors are not included.
"""
from __future__ import annotations

import asyncio

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields
from moco_ray.strategies.text._shared import (
    check_model,
    choose_model,
    fitted_model,
    generate_all,
    listing,
    plain,
    user_text,
    with_user_text,
)
from moco_ray.tasks.base import DevSplit, Example

KNOWLEDGE = (
    "You are an AI assistant that writes background knowledge to help answer a user's question. "
    "Give relevant facts and information that would help answer the question below; do not "
    "answer it.\n\nQuestion:\n{question}\n\nRelevant knowledge:"
)
RELEVANCE = (
    "Question:\n{question}\n\nKnowledge:\n{knowledge}\n\n"
    "Is this knowledge relevant and helpful for answering the question? Answer Yes or No.\n"
    "Answer:"
)
ANSWER = (
    "You are part of a team of AI assistants answering a user's question together. Other "
    "assistants wrote the following knowledge to help.\n\nKnowledge:\n{knowledge}\n\n"
    "Question:\n{question}\n\nAnswer the question with the help of the knowledge above, in the "
    "format the question asks for."
)


@register("text_knowledge_card")
class KnowledgeCard(Strategy):
    level = "text"
    summary = "models write knowledge for the question; the most relevant goes to the main model"

    class Params(SamplingFields):
        main_model: str | None = Field(None, description="model that answers; None: the best "
                                                         "single model on dev (reference)")
        exclude_self: bool = Field(False, description="drop the main model's own card "
                                                      "(reference: False)")
        top_k: int | None = Field(None, ge=1, description="cards kept by the relevance "
                                                          "selector; None keeps all (reference)")
        relevance_model: str | None = Field(None, description="pool model that judges relevance "
                                                              "(None: the main model)")
        dev_size: int | None = Field(None, ge=1, description="dev examples to choose the main "
                                                              "model on (None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        if p.relevance_model is not None:
            check_model(p.relevance_model, ctx.pool.models, "relevance_model")
        await choose_model(self, ctx, dev, p.main_model, "main_model", p.dev_size)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        main = fitted_model(self, "main_model")
        p = self.params
        base = ctx.task.prompt(example)
        question = user_text(base)
        authors = [m for m in ctx.models if not (p.exclude_self and m == main)]
        if not authors:
            raise ValueError("text_knowledge_card with exclude_self=True needs a model besides "
                             f"the main model {main!r}; the job has {ctx.models}")
        texts = await generate_all(ctx, p, [(m, plain(KNOWLEDGE.format(question=question)))
                                            for m in authors], "knowledge")
        cards = dict(zip(authors, texts))
        relevance: dict[str, float] = {}
        chosen = list(authors)
        if p.top_k is not None and p.top_k < len(authors):
            judge = p.relevance_model or main
            scores = await asyncio.gather(*(ctx.score(
                judge, plain(RELEVANCE.format(question=question, knowledge=cards[m].strip())),
                ["Yes", "No"], step="relevance") for m in authors))
            relevance = {m: yes.sum_logprob - no.sum_logprob
                         for m, (yes, no) in zip(authors, scores)}
            # Most relevant first; sorted() is stable, so ties keep the job's model order.
            chosen = sorted(authors, key=lambda m: -relevance[m])[:p.top_k]
        prompt = with_user_text(base, ANSWER.format(
            knowledge=listing([cards[m] for m in chosen]), question=question))
        [final] = await generate_all(ctx, p, [(main, prompt)], "answer")
        return Answer(output=final, meta={"main_model": main, "cards": cards,
                                          "relevance": relevance, "selected": chosen})
