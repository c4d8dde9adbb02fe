"""ExPO, model extrapolation: theta = theta_1 + alpha * (theta_1 - theta_0), pushing past a
stronger model theta_1 in the direction it took from a weaker theta_0. Model Extrapolation
Expedites Alignment (Zheng et al., 2024); MoCo `weight_expo.py`.

The endpoints, as the reference's modes:
- 'worst_to_best' (default): every member is scored on dev (through the scratch); theta_0 is the
  worst, theta_1 the best.
- 'topk_bottomk': theta_1 is the uniform average of the k best members, theta_0 of the k worst.
- 'pair': the reference's legacy mode with explicit models: `source` (theta_0, e.g. an SFT model)
  and `target` (theta_1, e.g. its DPO-aligned successor), named as pool members.
alpha is chosen on dev among `alpha_candidates` (alpha_mode 'optimized', the default here, since
the paper tunes alpha per model; the reference's default is 'fixed' with alpha 0.3): each
extrapolation is scored through the scratch and the best answers (the smallest alpha on ties).
Extrapolation is always applied, as in the reference (no alpha = 0 unless listed): add 0.0 to
`alpha_candidates` to let theta_1 itself compete on dev. Departure: the reference's 'pairs' mode
picks among several SFT/DPO pairs; here one pair. Each extrapolation is one streaming pass over
the endpoint members' dirs: per tensor, theta_0 and theta_1 are averaged, then extrapolated.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from pydantic import Field, model_validator

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.weight._merge import (
    Candidates,
    WeightFields,
    answer_with,
    combine,
    extrapolate_tensor,
    load_members,
    require_fitted,
)
from moco_ray.tasks.base import DevSplit, Example


def endpoints(scores: dict[str, float], mode: str, k: int = 1) -> tuple[list[str], list[str]]:
    """(source models, target models) from the members' dev scores, best first; ties keep the
    given order, so the first of equals counts as better."""
    order = sorted(scores, key=lambda m: -scores[m])
    if mode == "worst_to_best":
        k = 1
    if 2 * k > len(order):
        raise ValueError(f"params.k={k}: top-{k} and bottom-{k} would overlap among "
                         f"{len(order)} models; use k <= {len(order) // 2}")
    return order[-k:], order[:k]


async def choose_alpha(alphas: Sequence[float],
                       evaluate: Callable[[float], Awaitable[float]]) -> tuple[float, list[float]]:
    """The alpha with the best dev score (the first, i.e. smallest when sorted, on ties) and
    every alpha's score."""
    alphas = sorted(set(alphas))
    scores = [await evaluate(a) for a in alphas]
    best = max(range(len(alphas)), key=lambda i: scores[i])
    return alphas[best], scores


@register("weight_expo")
class ExPO(Strategy):
    level = "weight"
    summary = "extrapolate from a weaker to a stronger member, alpha chosen on dev"
    needs_scratch = True

    class Params(WeightFields):
        mode: Literal["worst_to_best", "topk_bottomk", "pair"] = Field(
            "worst_to_best", description="how theta_0 and theta_1 are chosen (module docstring)")
        k: int = Field(1, ge=1, description="models averaged per end, 'topk_bottomk' mode")
        source: str | None = Field(None, description="theta_0 member, 'pair' mode")
        target: str | None = Field(None, description="theta_1 member, 'pair' mode")
        alpha_mode: Literal["optimized", "fixed"] = Field(
            "optimized", description="choose alpha on dev, or use `alpha` as is")
        alpha: float = Field(0.3, description="extrapolation coefficient, 'fixed' mode")
        alpha_candidates: list[float] = Field(
            [0.1, 0.2, 0.3, 0.4, 0.5], min_length=1, description="alphas tried, 'optimized'")

        @model_validator(mode="after")
        def _pair(self):
            if self.mode == "pair" and (self.source is None or self.target is None):
                raise ValueError("mode 'pair' needs both source (theta_0) and target (theta_1)")
            if self.mode == "pair" and self.source == self.target:
                raise ValueError(f"source and target are both {self.source!r}; name two models")
            return self

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        members = await load_members(ctx, min_models=2, who=self.name)
        cands = Candidates(ctx, dev, p, self.name, members)
        member_scores: dict[str, float] = {}
        if p.mode == "pair":
            missing = [m for m in (p.source, p.target) if m not in members.names]
            if missing:
                raise ValueError(f"params.source/target {missing} are not models of this job "
                                 f"({members.names})")
            source, target = [p.source], [p.target]
        else:
            for m in members.names:
                member_scores[m] = await cands.score_dir(members.dirs[m], m)
            source, target = endpoints(member_scores, p.mode, p.k)
        inputs, k0, k1 = members.ordered(source + target), len(source), len(target)
        paths: dict[float, str] = {}

        async def evaluate(alpha: float) -> float:
            def fn(name, ts):  # theta_0, theta_1: uniform soups of the source and target models
                theta0 = combine(ts[:k0], [1.0 / k0] * k0)
                theta1 = combine(ts[k0:], [1.0 / k1] * k1)
                return extrapolate_tensor(theta1, theta0, alpha)

            paths[alpha], score = await cands.score_merge(inputs, fn, f"alpha{alpha:g}")
            return score

        alphas = p.alpha_candidates if p.alpha_mode == "optimized" else [p.alpha]
        alpha, scores = await choose_alpha(alphas, evaluate)
        cands.prune({paths[alpha]})
        self.fitted.update(weights=paths[alpha], alpha=alpha, dev_score=max(scores),
                           alpha_scores=dict(zip(sorted(set(alphas)), scores)), source=source,
                           target=target, member_scores=member_scores,
                           candidates=cands.summary())

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        weights = require_fitted(self)
        text = await answer_with(ctx, weights, self.params)
        return Answer(output=text, meta={"weights": weights, "alpha": self.fitted["alpha"],
                                         "source": self.fitted["source"],
                                         "target": self.fitted["target"]})
