"""LLM-Blender: every model answers; a ranker compares the candidates pairwise (PairRanker), and a
fuser model merges the top-k into the final answer (GenFuser). LLM-Blender (Jiang et al., ACL
2023); MoCo `text_llm_blender.py`, whose zero-shot backend this follows: every pair (i < j) is
judged once, a win scores 1, an unclear verdict 0.5 to each, candidates are ranked by wins
(ties: job order), top_k = 3, ranker verdicts of at most 128 tokens, fuser = the job's first model.

The ranker is any pool model (it need not be a candidate): 'judge' asks it to name the better
answer (A or B); 'likelihood' compares its log-likelihood of "A" and "B" after the same prompt
(`ctx.score`), which cannot be unclear. `both_orders` also judges each pair swapped, against the
position bias of small judges (the paper's PairRanker sees both orders; the reference one).
The reference's options to fine-tune ranker and fuser on dev are training, not done here.
"""
from __future__ import annotations

import asyncio
import re
from typing import Literal

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields
from moco_ray.strategies.text._shared import (
    check_model,
    generate_all,
    plain,
    user_text,
    with_user_text,
)
from moco_ray.tasks.base import DevSplit, Example

PAIR = (
    "You are a judge comparing two answers to a user's question.\n\nQuestion:\n{question}\n\n"
    "Candidate A:\n{a}\n\nCandidate B:\n{b}\n\n"
    "Which answer is better, A or B? Reply with a single letter: A or B.\nBetter:"
)
FUSE = (
    "You combine several candidate answers into one high-quality answer. Use the good parts of "
    "each candidate, ignore their mistakes, and be accurate and concise.\n\n"
    "Question:\n{question}\n\nCandidate answers, best first according to a judge:\n{candidates}"
    "\n\nWrite the final answer to the question, in the format the question asks for."
)
_VERDICT = re.compile(r"\b([AB])\b")


@register("text_llm_blender")
class LLMBlender(Strategy):
    level = "text"
    summary = "a ranker compares every pair of answers; a fuser merges the top-k"

    class Params(SamplingFields):
        top_k: int = Field(3, ge=1, description="candidates the fuser sees (reference: 3)")
        ranking: Literal["judge", "likelihood"] = Field(
            "judge", description="'judge': the ranker writes its verdict (reference); "
                                 "'likelihood': its log-likelihood of 'A' vs 'B'")
        ranker: str | None = Field(None, description="pool model that ranks (None: the job's "
                                                     "first model)")
        fuser: str | None = Field(None, description="pool model that fuses (None: the job's "
                                                    "first model, as the reference)")
        ranker_max_tokens: int = Field(128, ge=1, description="verdict length ('judge'; "
                                                              "reference: 128)")
        both_orders: bool = Field(False, description="judge each pair in both orders "
                                                     "(reference: one order)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        self._roles(ctx.models, ctx.pool.models)  # nothing to tune; fail early on bad names

    def _roles(self, models: list[str], pool_models: list[str]) -> tuple[str, str]:
        p = self.params
        ranker = check_model(p.ranker or models[0], pool_models, "ranker")
        return ranker, check_model(p.fuser or models[0], pool_models, "fuser")

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        p, models = self.params, ctx.models
        ranker, fuser = self._roles(models, ctx.job.pool.models)
        base = ctx.task.prompt(example)
        question = user_text(base)
        cands = await generate_all(ctx, p, [(m, base) for m in models], "candidate")
        pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
        if p.both_orders:
            pairs += [(j, i) for i, j in pairs]
        verdicts = await self._judge(ctx, ranker, question, cands, pairs)
        wins = [0.0] * len(models)
        for (i, j), v in zip(pairs, verdicts):
            if v == "A":
                wins[i] += 1.0
            elif v == "B":
                wins[j] += 1.0
            else:  # unclear: half a win each, as the reference
                wins[i] += 0.5
                wins[j] += 0.5
        order = sorted(range(len(models)), key=lambda k: -wins[k])  # stable: job order on ties
        top = order[:p.top_k]
        ranked = "\n\n".join(f"Candidate {r + 1}:\n{cands[k].strip()}" for r, k in enumerate(top))
        prompt = with_user_text(base, FUSE.format(question=question, candidates=ranked))
        [final] = await generate_all(ctx, p, [(fuser, prompt)], "fuse")
        return Answer(output=final, meta={
            "candidates": dict(zip(models, cands)), "wins": dict(zip(models, wins)),
            "ranking": [models[k] for k in order], "fused": [models[k] for k in top],
            "ranker": ranker, "fuser": fuser})

    async def _judge(self, ctx: ExampleContext, ranker: str, question: str, cands: list[str],
                     pairs: list[tuple[int, int]]) -> list[str]:
        """'A', 'B' or '' (unclear) per pair, where A is the pair's first candidate."""
        prompts = [plain(PAIR.format(question=question, a=cands[i].strip(), b=cands[j].strip()))
                   for i, j in pairs]
        if self.params.ranking == "likelihood":
            scores = await asyncio.gather(*(ctx.score(ranker, pr, ["A", "B"], step="rank")
                                            for pr in prompts))
            return ["A" if a.sum_logprob > b.sum_logprob else
                    "B" if b.sum_logprob > a.sum_logprob else "" for a, b in scores]
        sp = self.params.model_copy(update={"max_tokens": self.params.ranker_max_tokens})
        texts = await generate_all(ctx, sp, [(ranker, pr) for pr in prompts], "rank")
        return [_verdict(t) for t in texts]


def _verdict(text: str) -> str:
    """The first standalone 'A' or 'B' of the verdict; '' if it names neither."""
    m = _VERDICT.search(text)
    return m.group(1) if m else ""
