"""MentorCollab: a mentee (generator) writes word by word; at a random `decision_proportion`
percent of the steps it consults a mentor. If the mentor's next word differs, both models write
a patch of `patch_size` tokens and the mentee itself judges which patch leads to the correct
answer ("Option (A)" = its own, "(B)" = the mentor's); the chosen patch is appended. Wang et
al., 2025, "MentorCollab: Selective Large-to-Small Inference-Time Guidance for Efficient
Reasoning"; MoCo `api_mentor_collab.py` (its 'free' mode), whose defaults these are
(decision_proportion 25, patch_size 16, greedy decoding, word = first token plus up to 10 more
until a token starts with whitespace).

The reference's 'train' mode needs an MLP judge downloaded from the hub for a fixed list of
models; it is not offered (no download at run time, and our models are not on that list).

Fixes over the reference: decoding ends when the chosen piece is empty (the model emitted EOS;
the reference looped until the token budget); each model sees the prompt in its own chat template
(the reference gave both one raw prompt); the consult happens with probability exactly
decision_proportion / 100 (the reference's `randint(1, 100) < p` is (p - 1) / 100).
Calls are raw-text continuations of the rendered prompt plus the answer so far.
"""
from __future__ import annotations

import asyncio

from pydantic import Field, model_validator

from moco_ray.records import SamplingParams
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields
from moco_ray.tasks.base import DevSplit, Example

JUDGE = ("\nNow I will choose the next sequence that could lead to the correct answer. "
         "Option (A): {mine}, Option (B): {mentor}. My choice: Option (")


@register("api_mentor_collab")
class MentorCollab(Strategy):
    level = "api"
    summary = "a mentee writes; sometimes a mentor proposes a patch, the mentee judges"

    class Params(SamplingFields):
        # The reference decodes greedily (words, patches and the judgement alike).
        temperature: float = Field(0.0, ge=0.0, description="0 = greedy (the reference's)")
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        mentee: str | None = Field(None, description="generator model (None: the job's first)")
        mentor: str | None = Field(None, description="mentor model (None: the job's second)")
        decision_proportion: float = Field(25.0, ge=0.0, le=100.0,
                                           description="percent of steps that consult the mentor")
        patch_size: int = Field(16, ge=1, description="tokens per patch when the words differ")
        word_max_tokens: int = Field(11, ge=1, description="tokens one word may take at most "
                                                           "(the reference: 1 + 10)")

        @model_validator(mode="after")
        def _check(self):
            if self.mentee is not None and self.mentee == self.mentor:
                raise ValueError(f"mentee and mentor are both {self.mentee!r}; pick two models")
            return self

    def _roles(self, ctx: StrategyContext) -> tuple[str, str]:
        models = ctx.models
        if len(models) < 2:
            raise ValueError(f"api_mentor_collab needs 2 models (mentee, mentor); the job has "
                             f"{models}")
        mentee = self.params.mentee or models[0]
        mentor = self.params.mentor or next(m for m in models if m != mentee)
        for role, m in (("mentee", mentee), ("mentor", mentor)):
            if m not in models:
                raise ValueError(f"params.{role}={m!r} is not among this job's models {models}")
        if mentee == mentor:
            raise ValueError(f"mentee and mentor are both {mentee!r}; pick two different models")
        return mentee, mentor

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        # Nothing to tune (the reference has no dev step); fail early on bad roles.
        self._roles(ctx)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        p = self.params
        mentee, mentor = self._roles(ctx.job)
        prompt = ctx.task.prompt(example)
        prefix = {m: ctx.job.pool.render(m, prompt) for m in (mentee, mentor)}
        out, used = "", 0
        consults = disagreements = adopted = 0
        budget = p.max_tokens or ctx.task.max_tokens
        while used < budget:
            piece, n = await self._word(ctx, mentee, prefix[mentee] + out)
            if ctx.rng.random() * 100.0 < p.decision_proportion:
                consults += 1
                mentor_word, _ = await self._word(ctx, mentor, prefix[mentor] + out)
                if mentor_word != piece:
                    disagreements += 1
                    sp = self._sampling(ctx, min(p.patch_size, budget - used))
                    [mine], [theirs] = await asyncio.gather(
                        ctx.generate(mentee, prefix[mentee] + out, sp, step="patch"),
                        ctx.generate(mentor, prefix[mentor] + out, sp, step="mentor_patch"))
                    judge = prefix[mentee] + out + JUDGE.format(mine=mine.text,
                                                                mentor=theirs.text)
                    [choice] = await ctx.generate(mentee, judge, self._sampling(ctx, 1),
                                                  step="judge")
                    chosen = theirs if choice.text.strip() == "B" else mine
                    adopted += chosen is theirs
                    piece, n = chosen.text, chosen.completion_tokens
            if not piece:  # the chosen model ended (EOS) or wrote nothing
                break
            out += piece
            used += max(n, 1)
        return Answer(output=out, meta={"mentee": mentee, "mentor": mentor, "consults": consults,
                                        "disagreements": disagreements,
                                        "mentor_patches": adopted})

    def _sampling(self, ctx: ExampleContext, max_tokens: int) -> SamplingParams:
        sp = self.params.sampling(ctx.task, ctx.rng)
        return sp.model_copy(update={"max_tokens": max_tokens})

    async def _word(self, ctx: ExampleContext, model: str, text: str) -> tuple[str, int]:
        """The model's next word after `text` and about how many tokens it takes."""
        [g] = await ctx.generate(model, text, self._sampling(ctx, self.params.word_max_tokens),
                                 step="word")
        word = first_word(g.text)
        if not g.text or word == g.text:
            return word, g.completion_tokens
        # One call for the word instead of one per token: its token count is estimated from
        # the share of characters kept (used only for the token budget).
        return word, max(1, round(g.completion_tokens * len(word) / len(g.text)))


def first_word(text: str) -> str:
    """Leading whitespace plus the run of non-whitespace after it: what the reference builds
    token by token (first token, then tokens until one starts with a space or newline)."""
    i = len(text) - len(text.lstrip())
    while i < len(text) and not text[i].isspace():
        i += 1
    return text[:i]
