"""LoraHub: compose modules linearly, theta = base + sum_i w_i * delta_i, with the coefficients
w found by gradient-free search on a few dev examples. LoraHub (Huang et al., 2023); MoCo
`weight_lorahub.py`.

Modules here are the members' full weight deltas from a shared base (delta_i = theta_i - base),
not LoRA adapters: the pool serves full weights, and a LoRA module's product B_i A_i is such a
delta, so the composition is linear in w: sum_i w_i B_i A_i. The paper and the reference
instead weight and sum the A's and the B's separately, which composes (sum_i w_i B_i)(sum_j
w_j A_j): each module's own term scales as w_i^2 (so a negative w_i does not subtract it), plus
cross terms w_i w_j B_i A_j. `base` names the shared base: a pool member, a 'zoo:' model or a
model dir; None takes the job's first model, which is then the base, not a module.

The objective is the reference's: (1 - mean dev score) + regular_coef * mean(|w|), minimised
over w in [-bound, bound]^n from w = 0 (the base) within `max_inference_step` evaluations
(each one candidate, scored through the scratch on the first `lorahub_dev_samples` dev
examples). The reference uses nevergrad's NGOpt (and the paper its CMA-ES); nevergrad is not a
dependency here, so the search is a small CMA-ES (`CMAES`, Hansen's standard update, samples
clipped to the bounds). Budget: reference 20 (the paper 40); here 10 by default on CPUs. The
best evaluated w answers the test set. Each composition is one streaming pass over the base's
and the modules' dirs (the modules are whole models here, so none is held in memory).
"""
from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import numpy as np
from pydantic import Field, model_validator

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.weight._merge import (
    Candidates,
    WeightFields,
    answer_with,
    linear_fn,
    load_members,
    require_fitted,
)
from moco_ray.tasks.base import DevSplit, Example

SIGMA0_FRACTION = 1 / 3  # initial CMA step size, as a share of the bound


class CMAES:
    """(mu/mu_w, lambda)-CMA-ES minimising f over R^n, samples clipped to [lower, upper]."""

    def __init__(self, x0: np.ndarray, sigma: float, lower: float, upper: float,
                 rng: np.random.Generator):
        n = self.n = len(x0)
        self.lower, self.upper, self.rng = lower, upper, rng
        self.lam = 4 + int(3 * math.log(n))
        self.mu = self.lam // 2
        w = math.log(self.mu + 0.5) - np.log(np.arange(1, self.mu + 1))
        self.w = w / w.sum()
        self.mueff = 1.0 / float((self.w ** 2).sum())
        self.cc = (4 + self.mueff / n) / (n + 4 + 2 * self.mueff / n)
        self.cs = (self.mueff + 2) / (n + self.mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + self.mueff)
        self.cmu = min(1 - self.c1,
                       2 * (self.mueff - 2 + 1 / self.mueff) / ((n + 2) ** 2 + self.mueff))
        self.damps = 1 + 2 * max(0.0, math.sqrt((self.mueff - 1) / (n + 1)) - 1) + self.cs
        self.chin = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self.mean, self.sigma = np.array(x0, dtype=float), float(sigma)
        self.pc, self.ps = np.zeros(n), np.zeros(n)
        self.B, self.D, self.C = np.eye(n), np.ones(n), np.eye(n)
        self.generation = 0

    def ask(self) -> list[np.ndarray]:
        z = self.rng.standard_normal((self.lam, self.n))
        xs = self.mean + self.sigma * (z * self.D) @ self.B.T
        return [np.clip(x, self.lower, self.upper) for x in xs]

    def tell(self, xs: list[np.ndarray], fs: list[float]) -> None:
        if len(xs) != self.lam:
            raise ValueError(f"tell needs the {self.lam} points of one ask, got {len(xs)}")
        idx = np.argsort(fs, kind="stable")[:self.mu]
        sel = np.array([xs[i] for i in idx])
        old = self.mean
        self.mean = self.w @ sel
        y = (self.mean - old) / self.sigma
        c_inv_sqrt = self.B @ np.diag(1 / self.D) @ self.B.T
        self.generation += 1
        self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * (
            c_inv_sqrt @ y)
        norm_ps = float(np.linalg.norm(self.ps))
        hsig = norm_ps / math.sqrt(1 - (1 - self.cs) ** (2 * self.generation)) / self.chin < (
            1.4 + 2 / (self.n + 1))
        self.pc = (1 - self.cc) * self.pc + hsig * math.sqrt(
            self.cc * (2 - self.cc) * self.mueff) * y
        art = (sel - old) / self.sigma
        self.C = ((1 - self.c1 - self.cmu) * self.C
                  + self.c1 * (np.outer(self.pc, self.pc)
                               + (1 - hsig) * self.cc * (2 - self.cc) * self.C)
                  + self.cmu * (art.T * self.w) @ art)
        self.sigma *= math.exp((self.cs / self.damps) * (norm_ps / self.chin - 1))
        self.C = (self.C + self.C.T) / 2
        eig, self.B = np.linalg.eigh(self.C)
        self.D = np.sqrt(np.maximum(eig, 1e-20))


async def lorahub_search(n: int, evaluate: Callable[[list[float]], Awaitable[float]],
                         budget: int, bound: float, regular_coef: float,
                         rng: np.random.Generator) -> dict:
    """Minimise (1 - evaluate(w)) + regular_coef * mean|w| over [-bound, bound]^n with at most
    `budget` evaluations: w = 0 first, then CMA-ES generations (the last one may be partial).
    Returns the best w, its objective and score, and every (w, score, objective) tried."""
    tried: list[dict] = []

    async def f(w: np.ndarray) -> float:
        ws = [float(v) for v in w]
        score = await evaluate(ws)
        obj = (1.0 - score) + regular_coef * sum(abs(v) for v in ws) / n
        tried.append({"w": ws, "score": score, "objective": obj})
        return obj

    await f(np.zeros(n))
    es = CMAES(np.zeros(n), SIGMA0_FRACTION * bound, -bound, bound, rng)
    while len(tried) < budget:
        xs = es.ask()[:budget - len(tried)]
        fs = [await f(x) for x in xs]
        if len(xs) == es.lam:
            es.tell(xs, fs)
    best = min(tried, key=lambda t: t["objective"])  # first on ties
    return {"w": best["w"], "score": best["score"], "objective": best["objective"],
            "tried": tried}


@register("weight_lorahub")
class LoraHub(Strategy):
    level = "weight"
    summary = "base + sum_i w_i * (member_i - base), w found by gradient-free search on dev"
    needs_scratch = True

    class Params(WeightFields):
        base: str | None = Field(None, description="shared base model: a pool member, 'zoo:' "
                                 "model or model dir (None: the job's first model)")
        lorahub_dev_samples: int = Field(5, ge=1, description="dev examples per evaluation")
        max_inference_step: int = Field(10, ge=1, description="evaluations (candidates) of the "
                                        "search (reference: 20; paper: 40)")
        lora_weight_bound: float = Field(1.5, gt=0.0, description="coefficients lie in "
                                         "[-bound, bound]")
        regular_coef: float = Field(0.05, ge=0.0, description="L1 penalty on mean |w|")

        @model_validator(mode="after")
        def _dev(self):
            if self.dev_size is not None:
                raise ValueError("weight_lorahub scores each candidate on the first "
                                 "lorahub_dev_samples dev examples; set that, not dev_size")
            return self

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        # model_copy skips validation: dev_size set here, not by the user (the validator)
        p = self.params.model_copy(update={"dev_size": self.params.lorahub_dev_samples})
        base_ref = p.base if p.base is not None else ctx.models[0]
        members = await load_members(ctx, base=base_ref, who=self.name)
        modules = [m for m in members.names if m != base_ref]
        if not modules:
            raise ValueError(f"weight_lorahub composes the job's models other than the base "
                             f"{base_ref!r}, and there are none; add models or set params.base")
        cands = Candidates(ctx, dev, p, self.name, members)
        inputs = [members.base, *members.ordered(modules)]
        paths: dict[tuple[float, ...], str] = {}

        async def evaluate(w: list[float]) -> float:
            # base + sum w_i (theta_i - base) = (1 - sum w) base + sum w_i theta_i
            label = "w_" + "_".join(f"{v:+.3f}" for v in w)
            paths[tuple(w)], score = await cands.score_merge(
                inputs, linear_fn([1.0 - sum(w), *w]), label)
            return score

        result = await lorahub_search(len(modules), evaluate, p.max_inference_step,
                                      p.lora_weight_bound, p.regular_coef,
                                      np.random.default_rng(ctx.seed))
        chosen = paths[tuple(result["w"])]
        cands.prune({chosen})
        self.fitted.update(weights=chosen, dev_score=result["score"],
                           coefficients=dict(zip(modules, result["w"])), base=base_ref,
                           objective=result["objective"], candidates=cands.summary())

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        weights = require_fitted(self)
        text = await answer_with(ctx, weights, self.params)
        return Answer(output=text, meta={"weights": weights,
                                         "coefficients": self.fitted["coefficients"],
                                         "dev_score": self.fitted["dev_score"]})
