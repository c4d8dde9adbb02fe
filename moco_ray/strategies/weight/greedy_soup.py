"""Greedy soup: average the weights of the members that help on dev. Model soups (Wortsman et
al., 2022), greedy recipe; MoCo `weight_greedy_soup.py` (no method hyperparameters).

Every member is scored on dev, then the members are visited best first: the soup starts as the
best member alone, and each next member joins if the uniform average of the soup plus it scores
on dev at least as well as the soup so far (the paper's `>=`: a member that does not hurt stays).
The final soup answers the test set. All scoring, members included, runs through the scratch
deployment (each candidate hot-swapped in) with greedy decoding, so every comparison uses one
engine and one decoding; n members cost at most 2n - 1 dev passes. Each soup is one streaming
pass over its ingredients' dirs (`_merge.stream_merge`).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

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

Evaluate = Callable[[list[str]], Awaitable[float]]


async def greedy_soup(members: Sequence[str], evaluate: Evaluate) -> dict:
    """The greedy soup recipe over `members`, with `evaluate(ingredients) -> dev score` scoring
    the uniform soup of a list of members (one member: that member itself). Returns the
    ingredients, their soup's score, each member's own score and the order they were tried in."""
    if not members:
        raise ValueError("greedy soup needs at least one member")
    single = {m: await evaluate([m]) for m in members}
    order = sorted(members, key=lambda m: -single[m])  # stable: ties keep the given order
    soup, best = [order[0]], single[order[0]]
    tried: list[dict] = []
    for m in order[1:]:
        score = await evaluate(soup + [m])
        accepted = score >= best
        tried.append({"add": m, "score": score, "accepted": accepted})
        if accepted:
            soup, best = soup + [m], score
    return {"ingredients": soup, "score": best, "member_scores": single, "order": order,
            "tried": tried}


@register("weight_greedy_soup")
class GreedySoup(Strategy):
    level = "weight"
    summary = "uniform weight average of the members that do not lower the dev score, best first"
    needs_scratch = True

    class Params(WeightFields):
        pass

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        members = await load_members(ctx, who=self.name)
        cands = Candidates(ctx, dev, self.params, self.name, members)
        dirs: dict[tuple[str, ...], str] = {}

        async def evaluate(ingredients: list[str]) -> float:
            if len(ingredients) == 1:
                path = members.dirs[ingredients[0]]
                dirs[tuple(ingredients)] = path
                return await cands.score_dir(path, ingredients[0])
            n = len(ingredients)
            path, score = await cands.score_merge(members.ordered(ingredients),
                                                  linear_fn([1.0 / n] * n),
                                                  "soup_" + "+".join(ingredients))
            dirs[tuple(ingredients)] = path
            return score

        result = await greedy_soup(members.names, evaluate)
        chosen = dirs[tuple(result["ingredients"])]
        cands.prune({chosen})
        self.fitted.update(weights=chosen, dev_score=result["score"],
                           ingredients=result["ingredients"],
                           member_scores=result["member_scores"], tried=result["tried"],
                           candidates=cands.summary())

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        weights = require_fitted(self)
        text = await answer_with(ctx, weights, self.params)
        return Answer(output=text, meta={"weights": weights,
                                         "ingredients": self.fitted["ingredients"],
                                         "dev_score": self.fitted["dev_score"]})
