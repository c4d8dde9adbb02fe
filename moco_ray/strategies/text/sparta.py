"""SPARTA ALIGNMENT (Jiang, Ding, Feng, Durrett, Tsvetkov 2025, "Collectively Aligning Multiple
Language Models through Combat"); MoCo `text_sparta.py`.

On dev, per round: every dev instruction gets a duel between two pool models (a first model in
shuffled order, an opponent chosen at random with probability `random_match_prob`, else among
the `num_opponents` with the closest reputation); both answer; every other model judges the duel
(a pairwise prompt: both answers, a 1-10 score for each); the judges' scores are averaged with
their reputations as weights; an adapted Elo update (the reference's "normal" rating system:
erf win-probability gap, K decaying over the round's updates from `initial_k` to `min_k`,
deviation from a window of recent rating changes, ratings floored at 10; the first duelist moves
first, so the second's update sees its new rating) moves the duelists' reputations. As in the
reference, every round starts a new rating system: ratings, deviations and the window of rating
changes carry over, and K starts again from `initial_k`. The winning answer is preferred over
the losing one (ties dropped), and every model is DPO-trained (LoRA adapter, TRL DPOTrainer in
Ray Train + DeepSpeed, reference = the frozen base) on all the round's pairs. Later rounds duel,
judge and train with the previous round's adapters.

At test the final answer comes from one (model, adapter): 'dev_best' (the reference) evaluates
every model's adapter of every round on dev and keeps the best; 'reputation' takes the model with
the highest reputation after the last round, with its last adapter.

Departures: one round by default (the reference runs 3; each round trains every model, slow on
CPU); the judging prompt shows both answers at once and asks a 1-10 score for each (the reference
scores each answer alone), and `judge_mode='likelihood'` (not in the reference) reads a judge's
p(A) vs p(B) instead, for judges too small to write scores; DPO trains LoRA r <= 16 adapters
(vLLM serves them per request) with a higher learning rate than the reference's 1e-6 default,
for a few dozen steps; 'dev_best' also considers the untrained models (round 0); later
rounds' DPO reference is the previous round's adapter (TRL keeps a frozen copy), as the
reference DPO-trains the previous round's model; the 'dynamic'/'static' judge-weight variants
are not implemented (only 'normal').
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from moco_ray.records import Prompt
from moco_ray.strategies import training
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.strategies.text._shared import plain, user_text
from moco_ray.strategies.training import adapter_config
from moco_ray.tasks.base import DevSplit, Example

JUDGE = (
    "You are judging two responses to the same question.\n\nQuestion:\n{question}\n\n"
    "Response A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Rate how well each response answers the question, from 1 (useless) to 10 (perfect). "
    "Reply in exactly this format:\nScore A: <1-10>\nScore B: <1-10>"
)
PICK = (
    "You are judging two responses to the same question.\n\nQuestion:\n{question}\n\n"
    "Response A:\n{a}\n\nResponse B:\n{b}\n\nWhich response is better, A or B? "
    "Reply with a single letter.\nBetter:"
)
_SCORE = {side: re.compile(rf"score\s*{side}\s*[:=]?\s*(\d+)", re.IGNORECASE) for side in "AB"}
NEUTRAL = 5.0  # a judge whose verdict cannot be read scores both answers 5 (the reference's)


def parse_scores(text: str) -> tuple[float, float] | None:
    """(score A, score B) from a verdict, each in 1..10; None when it cannot be read."""
    got = []
    for side in "AB":
        m = _SCORE[side].search(text)
        got.append(int(m.group(1)) if m else None)
    if None in got:  # fall back to the first two numbers in range, in order
        nums = [int(n) for n in re.findall(r"\d+", text) if 1 <= int(n) <= 10]
        if len(nums) < 2:
            return None
        got = nums[:2]
    if not all(1 <= g <= 10 for g in got):
        return None
    return float(got[0]), float(got[1])


@dataclass
class Rating:
    score: float
    deviation: float


@dataclass
class Reputation:
    """The reference's Elo-like reputation ('normal' rating system) for one round. `update(duel)`
    moves both duelists after one judged duel; judges weigh by their rating at that moment.
    `next_round()` is the next round's system."""

    ratings: dict[str, Rating]
    initial_k: float = 10.0
    min_k: float = 5.0
    window_size: int = 10
    min_deviation: float = 0.1
    epsilon: float = 0.01
    decay_rate: float = 0.9
    decay_steps: int = 10
    scaling_factor: float = 20.0
    floor: float = 10.0
    frozen: bool = False
    updates: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def k(self) -> float:
        return max(self.min_k, self.initial_k * self.decay_rate ** (self.updates / self.decay_steps))

    def weighted(self, judged: dict[str, tuple[float, float]], duelists: tuple[str, str]
                 ) -> tuple[float, float] | None:
        """Reputation-weighted mean scores of the two answers over judges outside the duel."""
        total = wa = wb = 0.0
        for judge, (sa, sb) in judged.items():
            if judge in duelists or judge not in self.ratings:
                continue
            w = self.ratings[judge].score
            wa, wb, total = wa + w * sa, wb + w * sb, total + w
        if total <= 0:
            return None
        return wa / total, wb / total

    def update(self, duelists: tuple[str, str], judged: dict[str, tuple[float, float]]) -> None:
        if self.frozen:
            return
        self.updates += 1
        k = self.k
        w = self.weighted(judged, duelists)
        if w is None:
            return
        diff = w[0] - w[1]
        a, b = duelists
        moved: dict[str, float] = {}
        # In order, as the reference: b's gap is computed from a's new rating; deviations change
        # only after both moved.
        for me, other, sign in ((a, b, 1.0), (b, a, -1.0)):
            ri, rj = self.ratings[me], self.ratings[other]
            sigma = math.hypot(ri.deviation, rj.deviation) or 1e-6
            gap = math.erf((ri.score - rj.score) / (math.sqrt(2.0) * sigma))
            # |Phi(d) - Phi(-d)| = |erf(d / sqrt 2)|: how surely the ratings order the pair
            delta = k * sign * diff * math.tanh(ri.deviation) * max(abs(gap), self.epsilon)
            old = ri.score
            ri.score = max(self.floor, old + delta / self.scaling_factor)
            moved[me] = ri.score - old
        for me, change in moved.items():
            hist = self.history.setdefault(me, [])
            hist.append(change)
            del hist[:-self.window_size]
            if len(hist) >= 2:
                self.ratings[me].deviation = max(statistics.pstdev(hist), self.min_deviation)

    def scores(self) -> dict[str, float]:
        return {m: r.score for m, r in self.ratings.items()}

    def next_round(self) -> Reputation:
        """A new rating system for the next round, as the reference builds one per round:
        ratings, deviations and the window of rating changes carry over; the update count starts
        at 0, so K starts again from `initial_k`."""
        return dataclasses.replace(
            self, ratings={m: Rating(r.score, r.deviation) for m, r in self.ratings.items()},
            history={m: list(h) for m, h in self.history.items()}, updates=0)


def choose_opponent(first: str, models: list[str], scores: dict[str, float], rng,
                    random_match_prob: float, num_opponents: int) -> str:
    """The reference's match-making: a random opponent with probability `random_match_prob`,
    else one of the `num_opponents` models with the closest reputation."""
    others = [m for m in models if m != first]
    if rng.random() < random_match_prob:
        return rng.choice(others)
    near = sorted(others, key=lambda m: abs(scores[first] - scores[m]))  # stable: job order
    return rng.choice(near[:max(1, min(num_opponents, len(near)))])


def schedule(examples: list[Example], models: list[str], scores: dict[str, float], rng,
             random_match_prob: float, num_opponents: int) -> list[tuple[Example, str, str]]:
    """One duel per instruction: in blocks of len(models) instructions every model leads once
    (shuffled order); the remainder draws its first models at random."""
    out = []
    n = len(models)
    full = len(examples) // n * n
    for start in range(0, full, n):
        order = rng.sample(models, n)
        for ex, first in zip(examples[start:start + n], order):
            out.append((ex, first, choose_opponent(first, models, scores, rng,
                                                   random_match_prob, num_opponents)))
    for ex in examples[full:]:
        first = rng.choice(models)
        out.append((ex, first, choose_opponent(first, models, scores, rng, random_match_prob,
                                               num_opponents)))
    return out


async def train_dpo(ctx: StrategyContext, jobs: dict[str, tuple[str, list[dict], str | None]],
                    cfg, beta: float) -> dict[str, str]:
    """DPO-train one adapter per `{name: (pool_model, pairs, init_adapter)}`, all at once,
    from the weights each pool model serves now (the job's trainer); charged to the job's cost
    as train:<name>."""
    return await training.train_dpo(ctx, jobs, cfg, beta)


async def _answer(ectx: ExampleContext, model: str, adapter: str | None, prompt: Prompt,
                  params, step: str) -> str:
    if adapter is None:
        [g] = await ectx.generate(model, prompt, params, step=step)
    else:
        [g] = await ectx.generate_lora(model, adapter, prompt, params, step=step)
    return g.text


@register("text_sparta")
class Sparta(Strategy):
    level = "text"
    summary = ("models duel on dev, the others judge with reputation weights; winners vs losers "
               "DPO-train every model's adapter")

    class Params(SamplingFields):
        rounds: int = Field(1, ge=1, description="duel-judge-DPO rounds (reference: 3; 1 on CPU)")
        num_instructions: int | None = Field(
            500, ge=1, description="dev instructions dueled per round (reference: 500)")
        random_match_prob: float = Field(0.2, ge=0.0, le=1.0,
                                         description="chance of a random opponent")
        num_opponents: int = Field(3, ge=1, description="closest-reputation opponents to draw "
                                                        "from otherwise")
        judge_rounds: int = Field(1, ge=1, description="verdicts per judge and duel, averaged")
        judge_max_tokens: int = Field(256, ge=1, description="verdict length (reference: 256)")
        judge_temperature: float = Field(0.0, ge=0.0, description="judges decode greedily "
                                                                  "(reference: 1e-5)")
        judge_mode: Literal["generate", "likelihood"] = Field(
            "generate", description="'generate': the judge writes a 1-10 score per answer "
            "(reference); 'likelihood': its probabilities p(A), p(B) of naming each answer the "
            "better one become scores 1 + 9 p (never unreadable; for small judges)")
        initial_rating: float = Field(100.0, gt=0, description="starting reputation")
        initial_deviation: float = Field(0.5, gt=0, description="starting rating deviation")
        initial_k: float = Field(10.0, gt=0)
        min_k: float = Field(5.0, gt=0)
        window_size: int = Field(10, ge=2)
        min_deviation: float = Field(0.1, gt=0)
        epsilon: float = Field(0.01, ge=0)
        decay_rate: float = Field(0.9, gt=0, le=1)
        decay_steps: int = Field(10, ge=1)
        scaling_factor: float = Field(20.0, gt=0)
        freeze_ratings: bool = False
        final: Literal["dev_best", "reputation"] = Field(
            "dev_best", description="test answers from the (model, adapter) best on dev "
            "(reference) or the highest-reputation model")
        eval_dev_size: int | None = Field(None, ge=1, description="dev examples for 'dev_best' "
                                                                  "(None: all)")
        beta: float = Field(0.1, gt=0, description="DPO beta")
        lr: float = Field(5e-4, gt=0, description="DPO learning rate (LoRA)")
        max_steps: int = Field(30, ge=1, description="DPO optimizer steps per model and round")
        batch_size: int = Field(2, ge=1, description="pairs per step and worker")
        lora_r: int = Field(8, ge=1, le=16, description="LoRA rank (vLLM serves rank <= 16)")
        num_workers: int = Field(1, ge=1, description="Ray Train workers per model")

        @model_validator(mode="after")
        def _k_order(self):
            if self.min_k > self.initial_k:
                raise ValueError(f"min_k={self.min_k} exceeds initial_k={self.initial_k}; "
                                 "K decays from initial_k down to min_k")
            return self

    def dpo_config(self, seed: int, n_pairs: int):
        """The DPO settings of a round with `n_pairs` pairs: fewer pairs than one step takes
        (batch_size per worker) train on smaller batches; None when the pairs cannot give every
        worker one (that round trains nothing)."""
        p = self.params
        batch = min(p.batch_size, n_pairs // p.num_workers)
        if batch < 1:
            return None
        return adapter_config(lr=p.lr, max_steps=p.max_steps, batch_size=batch,
                              lora_r=p.lora_r, lora_alpha=2.0 * p.lora_r, grad_accum=1,
                              num_workers=p.num_workers, report_every=10, seed=seed)

    def reputation(self, models: list[str]) -> Reputation:
        p = self.params
        return Reputation(
            {m: Rating(p.initial_rating, p.initial_deviation) for m in models},
            initial_k=p.initial_k, min_k=p.min_k, window_size=p.window_size,
            min_deviation=p.min_deviation, epsilon=p.epsilon, decay_rate=p.decay_rate,
            decay_steps=p.decay_steps, scaling_factor=p.scaling_factor, frozen=p.freeze_ratings)

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, models = self.params, ctx.models
        if len(models) < 3:
            raise ValueError(f"text_sparta needs at least 3 models (two duel, the rest judge); "
                             f"the job has {models}")
        if not dev.examples:
            raise ValueError(f"dev split of task {dev.task!r} is empty; text_sparta duels on dev")
        rep = self.reputation(models)
        adapters: dict[str, str | None] = {m: None for m in models}
        history: list[dict[str, Any]] = []
        last_pairs: list[dict] = []  # the last round's DPO rows that trained (kept for meta)
        every: list[tuple[int, str, str | None]] = [(0, m, None) for m in models]
        for rnd in range(1, p.rounds + 1):
            if rnd > 1:
                rep = rep.next_round()
            examples = dev.examples[:p.num_instructions]
            duels = schedule(examples, models, rep.scores(), ctx.rng, p.random_match_prob,
                             p.num_opponents)
            judged = await self._duel_all(ctx, dev, duels, adapters)
            for d in judged:  # in schedule order, as the reference updates pair by pair
                rep.update((d["a"], d["b"]), d["judges"])
            pairs = preference_pairs(judged, rep)
            last_pairs = pairs or last_pairs
            info = {"round": rnd, "duels": len(judged), "pairs": len(pairs),
                    "ratings": rep.scores(), "k": rep.k}  # k: after the round's last update
            cfg = self.dpo_config(ctx.seed, len(pairs))
            if pairs and cfg is None:
                info["skipped"] = (f"{len(pairs)} pair(s) cannot give each of num_workers="
                                   f"{p.num_workers} workers one; no DPO this round")
            if cfg is not None:
                trained = await train_dpo(
                    ctx, {m: (m, pairs, adapters[m]) for m in models}, cfg, p.beta)
                adapters = {m: trained[m] for m in models}
                every += [(rnd, m, adapters[m]) for m in models]
                info["adapters"] = dict(adapters)
            history.append(info)
        self.fitted.update({"ratings": rep.scores(), "adapters": adapters, "rounds": history,
                            "pairs": last_pairs})
        if p.final == "reputation":
            best = max(models, key=lambda m: rep.ratings[m].score)  # job order on ties
            self.fitted["final"] = {"model": best, "adapter": adapters[best]}
        else:
            self.fitted["final"] = await self._dev_best(ctx, dev, every)

    async def _duel_all(self, ctx: StrategyContext, dev: DevSplit,
                        duels: list[tuple[Example, str, str]],
                        adapters: dict[str, str | None]) -> list[dict[str, Any]]:
        by_id = {ex.id: (a, b) for ex, a, b in duels}
        wanted = DevSplit(task=dev.task, examples=tuple(ex for ex, _, _ in duels))

        async def one(ectx: ExampleContext, ex: Example) -> dict[str, Any]:
            a, b = by_id[ex.id]
            return await self.duel(ectx, ex, a, b, adapters)

        return await over_dev(ctx, wanted, None, one)

    async def duel(self, ectx: ExampleContext, ex: Example, a: str, b: str,
                   adapters: dict[str, str | None]) -> dict[str, Any]:
        """Both duelists answer; every other model judges; per judge the mean (A, B) scores."""
        p = self.params
        prompt = ectx.task.prompt(ex)
        sps = [p.sampling(ectx.task, ectx.rng) for _ in range(2)]
        ra, rb = await asyncio.gather(_answer(ectx, a, adapters[a], prompt, sps[0], "combat"),
                                      _answer(ectx, b, adapters[b], prompt, sps[1], "combat"))
        judges = [m for m in ectx.models if m not in (a, b)]
        if p.judge_mode == "likelihood":
            means = await self._judge_likelihood(ectx, judges, prompt, ra, rb, adapters)
            return {"example": ex, "prompt": prompt, "a": a, "b": b, "responses": (ra, rb),
                    "judges": means}
        jp = plain(JUDGE.format(question=user_text(prompt), a=ra.strip(), b=rb.strip()))
        jparams = p.model_copy(update={"max_tokens": p.judge_max_tokens,
                                       "temperature": p.judge_temperature})
        calls = [(j, jparams.sampling(ectx.task, ectx.rng)) for j in judges
                 for _ in range(p.judge_rounds)]
        texts = await asyncio.gather(*(_answer(ectx, j, adapters[j], jp, sp, "judge")
                                       for j, sp in calls))
        verdicts: dict[str, list[tuple[float, float]]] = {j: [] for j in judges}
        for (j, _), t in zip(calls, texts):
            verdicts[j].append(parse_scores(t) or (NEUTRAL, NEUTRAL))
        means = {j: (sum(v[0] for v in vs) / len(vs), sum(v[1] for v in vs) / len(vs))
                 for j, vs in verdicts.items()}
        return {"example": ex, "prompt": prompt, "a": a, "b": b, "responses": (ra, rb),
                "judges": means}

    async def _judge_likelihood(self, ectx: ExampleContext, judges: list[str], prompt: Prompt,
                                ra: str, rb: str, adapters: dict[str, str | None]
                                ) -> dict[str, tuple[float, float]]:
        jp = plain(PICK.format(question=user_text(prompt), a=ra.strip(), b=rb.strip()))
        scores = await asyncio.gather(*(ectx.score(j, jp, ["A", "B"], step="judge",
                                                   lora=adapters[j]) for j in judges))
        out = {}
        for j, (sa, sb) in zip(judges, scores):
            top = max(sa.sum_logprob, sb.sum_logprob)
            pa, pb = math.exp(sa.sum_logprob - top), math.exp(sb.sum_logprob - top)
            out[j] = (1.0 + 9.0 * pa / (pa + pb), 1.0 + 9.0 * pb / (pa + pb))
        return out

    async def _dev_best(self, ctx: StrategyContext, dev: DevSplit,
                        every: list[tuple[int, str, str | None]]) -> dict[str, Any]:
        """Dev accuracy of every (round, model, adapter); the best (earliest on ties)."""
        p = self.params

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            prompt = ctx.task.prompt(ex)
            sps = [p.sampling(ctx.task, ectx.rng) for _ in every]
            texts = await asyncio.gather(*(_answer(ectx, m, ad, prompt, sp, "dev_eval")
                                           for (_, m, ad), sp in zip(every, sps)))
            return [ctx.task.score(t, ex) for t in texts]

        rows = await over_dev(ctx, dev, p.eval_dev_size, one)
        acc = [sum(r[i] for r in rows) / len(rows) for i in range(len(every))]
        best = max(range(len(every)), key=lambda i: (acc[i], -i))
        rnd, model, adapter = every[best]
        return {"model": model, "adapter": adapter, "round": rnd, "dev_accuracy": {
            f"{m}@{r}": a for (r, m, _), a in zip(every, acc)}}

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        final = self.fitted.get("final")
        if final is None:
            raise RuntimeError("text_sparta needs fit(dev) first: duels, judging and DPO "
                               "training happen on dev")
        p = self.params
        prompt = ctx.task.prompt(example)
        text = await _answer(ctx, final["model"], final["adapter"], prompt,
                             p.sampling(ctx.task, ctx.rng), "answer")
        return Answer(output=text, meta={"model": final["model"], "adapter": final["adapter"],
                                         "ratings": self.fitted["ratings"]})


def preference_pairs(judged: list[dict[str, Any]], rep: Reputation) -> list[dict]:
    """DPO rows from judged duels: the reputation-weighted winner's answer is chosen, the
    loser's rejected; ties (and identical answers) are dropped."""
    out = []
    for d in judged:
        w = rep.weighted(d["judges"], (d["a"], d["b"]))
        ra, rb = d["responses"]
        if w is None or w[0] == w[1] or ra == rb:
            continue
        chosen, rejected = (ra, rb) if w[0] > w[1] else (rb, ra)
        winner, loser = (d["a"], d["b"]) if w[0] > w[1] else (d["b"], d["a"])
        prompt = d["prompt"]
        out.append({"prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else list(prompt), "chosen": chosen, "rejected": rejected,
                    "example_id": d["example"].id, "winner": winner, "loser": loser,
                    "margin": abs(w[0] - w[1])})
    return out
