"""DARE-TIES: merge the members' deltas from a shared base by DARE (drop each delta entry with
probability 1 - density, rescale the rest by 1/density; Yu et al., 2024) and TIES (trim by
magnitude, elect each entry's sign, average only the deltas that agree; Yadav et al., 2023).
MoCo `weight_dare_ties.py` (its native merge, mergekit's `dare_ties` semantics).

Two modes, as the reference:
- 'average' (default): every member weighs 1/n; one merge, scored on dev for the record.
- 'optimized': the merge weights are softmax(z) of a particle z in R^n moved by particle swarm
  optimisation (positions and velocities start U(-1, 1), the update rule of Model Swarms,
  `model_swarms.WeightSwarm`), each particle's merge scored on dev through the scratch; the best
  merge answers. Reference: population 5, 5 iterations; here 3 and 3 by default (9 candidates,
  CPU-sized; raise them on GPUs).

Defaults are the reference's: density 1.0 (DARE keeps everything, so only TIES' sign election
and disjoint mean act) and uniform weights; the papers used sparser settings (DARE drop rate
0.9, i.e. density 0.1; TIES top-20%, i.e. trim_density 0.2). `base` names the shared base model:
a pool member, a 'zoo:' model or a model dir; None takes the job's first model (its delta is
zero, so it adds nothing but the starting point, as in mergekit when the base is also listed).
DARE's random masks are seeded per tensor by the job seed and the tensor's name
(`_merge.tensor_seed`), so a merge is reproducible and does not depend on the order tensors are
streamed in. Each merge is one streaming pass over the base's and the members' dirs.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.weight._merge import (
    Candidates,
    answer_with,
    dare_ties_tensor,
    load_members,
    require_fitted,
    softmax,
)
from moco_ray.strategies.weight.model_swarms import SwarmFields, WeightSwarm
from moco_ray.tasks.base import DevSplit, Example


@register("weight_dare_ties")
class DareTies(Strategy):
    level = "weight"
    summary = "DARE-TIES merge of the members' deltas from a base; weights uniform or PSO on dev"
    needs_scratch = True

    class Params(SwarmFields):
        base: str | None = Field(None, description="shared base model: a pool member, 'zoo:' "
                                 "model or model dir (None: the job's first model)")
        mode: Literal["average", "optimized"] = Field(
            "average", description="uniform merge weights, or weights searched by PSO on dev")
        density: float = Field(1.0, gt=0.0, le=1.0, description="DARE keep probability")
        trim_density: float = Field(1.0, gt=0.0, le=1.0, description="TIES magnitude trim: "
                                    "share of each delta kept (1.0: no trim, as mergekit)")
        population: int = Field(3, ge=1, description="PSO particles, 'optimized' mode "
                                "(reference: 5)")
        max_iterations: int = Field(3, ge=1, description="PSO iterations, 'optimized' mode "
                                    "(reference: 5)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        base_ref = p.base if p.base is not None else ctx.models[0]
        members = await load_members(ctx, base=base_ref, who=self.name)
        cands = Candidates(ctx, dev, p, self.name, members)
        inputs, n = [members.base, *members.ordered()], len(members.names)

        async def merge_and_score(weights: list[float], label: str) -> tuple[str, float]:
            def fn(name, ts):
                return dare_ties_tensor(name, ts[0], ts[1:], weights, p.density, p.trim_density,
                                        seed=ctx.seed)

            return await cands.score_merge(inputs, fn, label)

        if p.mode == "average":
            weights = [1.0 / n] * n
            path, score = await merge_and_score(weights, "average")
            scores: list[list[float]] = [[score]]
        else:
            rng = ctx.rng
            pos = [{"z": torch.tensor([rng.uniform(-1, 1) for _ in range(n)])}
                   for _ in range(p.population)]
            vel = [{"z": torch.tensor([rng.uniform(-1, 1) for _ in range(n)])}
                   for _ in range(p.population)]
            swarm = WeightSwarm(pos, vel, p.swarm_settings(), rng)
            scores = []
            for it in range(p.max_iterations):
                results = []
                for i, x in enumerate(swarm.positions):
                    w = softmax(x["z"].tolist())
                    results.append(await merge_and_score(w, f"it{it}_particle{i}"))
                scores.append([s for _, s in results])
                stop = swarm.update([s for _, s in results], [r[0] for r in results])
                cands.prune({swarm.global_best_tag})
                if stop:
                    break
            path, score = swarm.global_best_tag, swarm.global_best_score
            weights = softmax(swarm.global_best["z"].tolist())
        cands.prune({path})
        self.fitted.update(weights=path, dev_score=score,
                           merge_weights=dict(zip(members.names, weights)),
                           base=members.base_name, scores=scores, candidates=cands.summary())

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        weights = require_fitted(self)
        text = await answer_with(ctx, weights, self.params)
        return Answer(output=text, meta={"weights": weights, "dev_score": self.fitted["dev_score"],
                                         "merge_weights": self.fitted["merge_weights"]})
