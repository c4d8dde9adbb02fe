"""Nudging: a base model decodes token by token; where it is unsure (its top-1 probability is
below `gamma`), a nudging model writes the next token, and keeps writing until it has finished
the word it started. Fei et al., 2024, "Nudging: Inference-time Alignment of LLMs via Guided
Decoding"; MoCo `api_nudging.py`, whose defaults these are (gamma 0.4, base = model 0, nudger =
model 1, optional dev grid search over gamma in {0.2, 0.3, 0.4, 0.5} and over nudging models).

The rule per step, as in the reference (state: nudging yes/no, nudged tokens in a row):
- nudging, and (no nudged token yet, or the nudger's token has no space, i.e. the word goes on,
  or base top-1 < gamma): the nudger's token;
- else if base top-1 >= gamma: the base's token (nudging stops);
- else (not nudging, base top-1 < gamma): the nudger's token (nudging starts).
The first token is always the nudger's. Decoding ends when the chosen model emits EOS.

Each step is one-token `generate` calls on the rendered prompt plus the answer so far (raw-text
continuation), so the models may use different tokenizers, as in the reference's stateless mode.
The nudger is only asked when its token can be chosen. Tuning (`search_*`) uses dev only.
"""
from __future__ import annotations

import asyncio
import math

from pydantic import Field, model_validator

from moco_ray.records import Generation, SamplingParams
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example


@register("api_nudging")
class Nudging(Strategy):
    level = "api"
    summary = "a base model decodes; a nudging model writes the words where the base is unsure"

    class Params(SamplingFields):
        # The reference samples both models at the config temperature, without top-p.
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        gamma: float = Field(0.4, gt=0.0, le=1.0, description="nudge when the base model's "
                                                             "top-1 probability is below this")
        base_model: str | None = Field(None, description="base model (None: the job's first)")
        nudging_model: str | None = Field(None, description="nudging model (None: the job's "
                                                            "second)")
        search_gamma: bool = Field(False, description="pick gamma from gamma_grid on dev")
        search_nudging: bool = Field(False, description="pick the nudger among all non-base "
                                                        "models on dev")
        gamma_grid: list[float] = Field([0.2, 0.3, 0.4, 0.5], min_length=1)
        dev_size: int | None = Field(None, ge=1, description="dev examples per candidate "
                                                             "(None: all)")

        @model_validator(mode="after")
        def _check(self):
            bad = [g for g in self.gamma_grid if not 0.0 < g <= 1.0]
            if bad:
                raise ValueError(f"gamma_grid values {bad} must lie in (0, 1]")
            if self.base_model is not None and self.base_model == self.nudging_model:
                raise ValueError(f"base_model and nudging_model are both {self.base_model!r}; "
                                 "nudging needs two different models")
            return self

    # --- roles and tuning ---------------------------------------------------------------------

    def _roles(self, ctx: StrategyContext) -> tuple[str, list[str]]:
        """The base model and the nudging candidates (the configured nudger first)."""
        p, models = self.params, ctx.models
        if len(models) < 2:
            raise ValueError(f"api_nudging needs at least 2 models; the job has {models}")
        base = p.base_model or models[0]
        others = [m for m in models if m != base]
        nudger = p.nudging_model or others[0]
        for role, m in (("base_model", base), ("nudging_model", nudger)):
            if m not in models:
                raise ValueError(f"params.{role}={m!r} is not among this job's models {models}")
        if nudger == base:
            raise ValueError(f"the nudging model {nudger!r} is also the base model; pick "
                             "another (params.nudging_model)")
        return base, [nudger] + [m for m in others if m != nudger]

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        base, nudgers = self._roles(ctx)
        gammas = [p.gamma] + [g for g in p.gamma_grid if g != p.gamma] if p.search_gamma \
            else [p.gamma]
        nudgers = nudgers if p.search_nudging else nudgers[:1]
        # The configured setting comes first, so it wins every tie (e.g. an all-zero dev).
        candidates = [(g, n) for g in gammas for n in nudgers]
        self.fitted.update(base=base, gamma=p.gamma, nudging_model=nudgers[0])
        if len(candidates) == 1:
            return

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            outs = []
            for g, n in candidates:  # in turn: each candidate is a long chain of calls anyway
                text, _ = await self._decode(ectx, ex, base, n, g)
                outs.append(ctx.task.score(text, ex))
            return outs

        rows = await over_dev(ctx, dev, p.dev_size, one)
        means = [sum(r[i] for r in rows) / len(rows) for i in range(len(candidates))]
        best = max(range(len(candidates)), key=lambda i: (means[i], -i))
        self.fitted.update(gamma=candidates[best][0], nudging_model=candidates[best][1],
                           dev_scores={f"{g}|{n}": s for (g, n), s in zip(candidates, means)})

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "base" in self.fitted:
            base, nudger, gamma = (self.fitted["base"], self.fitted["nudging_model"],
                                   self.fitted["gamma"])
        else:
            if self.params.search_gamma or self.params.search_nudging:
                raise RuntimeError("api_nudging with search_gamma/search_nudging needs "
                                   "fit(dev) first: it picks gamma and the nudger on dev")
            base, nudgers = self._roles(ctx.job)
            nudger, gamma = nudgers[0], self.params.gamma
        text, meta = await self._decode(ctx, example, base, nudger, gamma)
        return Answer(output=text, meta=meta)

    # --- decoding -----------------------------------------------------------------------------

    async def _decode(self, ctx: ExampleContext, example: Example, base: str, nudger: str,
                      gamma: float) -> tuple[str, dict]:
        p = self.params
        prompt = ctx.task.prompt(example)
        prefix = {m: ctx.job.pool.render(m, prompt) for m in (base, nudger)}
        out, sources = "", []  # sources: 'b' (base) or 'n' (nudger) per token
        nudging, accepted = True, 0
        for _ in range(p.max_tokens or ctx.task.max_tokens):
            base_sp, nudge_sp = self._one_token(ctx), self._one_token(ctx)
            if nudging:  # the nudger's token is needed either way: ask both at once
                (b_text, b_end, top1), (n_text, n_end, _) = await asyncio.gather(
                    self._next(ctx, base, prefix[base] + out, base_sp, "base_token"),
                    self._next(ctx, nudger, prefix[nudger] + out, nudge_sp, "nudge_token"))
            else:
                b_text, b_end, top1 = await self._next(ctx, base, prefix[base] + out, base_sp,
                                                       "base_token")
                n_text, n_end = "", True
                if top1 < gamma:
                    n_text, n_end, _ = await self._next(ctx, nudger, prefix[nudger] + out,
                                                        nudge_sp, "nudge_token")
            if nudging and (accepted == 0 or " " not in n_text or top1 < gamma):
                if n_end:
                    break
                accepted += 1
                piece, src = n_text, "n"
            elif top1 >= gamma:
                if b_end:
                    break
                nudging, accepted = False, 0
                piece, src = b_text, "b"
            else:
                if n_end:
                    break
                nudging, accepted = True, 1
                piece, src = n_text, "n"
            out += piece
            sources.append(src)
        return out, {"base": base, "nudging_model": nudger, "gamma": gamma,
                     "tokens": len(sources), "nudged_tokens": sources.count("n"),
                     "sources": "".join(sources)}

    def _one_token(self, ctx: ExampleContext) -> SamplingParams:
        # Drawn before any call starts, so the seeds do not depend on scheduling order.
        sp = self.params.sampling(ctx.task, ctx.rng, logprobs=1)
        return sp.model_copy(update={"max_tokens": 1})

    @staticmethod
    async def _next(ctx: ExampleContext, model: str, text: str, sp: SamplingParams,
                    step: str) -> tuple[str, bool, float]:
        """One token of `model` after `text`: (its text, whether the model ended, the model's
        top-1 probability at this position)."""
        [g] = await ctx.generate(model, text, sp, step=step)
        return g.text, _ended(g), _top1(g, model)


def _ended(g: Generation) -> bool:
    """EOS (or a stop string): a 'stop' with no text; a token that decodes to '' mid-word (a
    partial byte) comes back as 'length' and does not end the answer."""
    return not g.token_ids or (g.finish_reason == "stop" and not g.text)


def _top1(g: Generation, model: str) -> float:
    if not g.token_ids:
        return 1.0  # nothing was generated; the value is not used (the model ended)
    if not g.logprobs:
        raise RuntimeError(f"model {model!r} returned no logprobs although logprobs=1 was asked; "
                           "api_nudging needs an engine that reports token logprobs")
    lp = g.logprobs[0]
    return math.exp(max(lp.top.values()) if lp.top else lp.logprob)
