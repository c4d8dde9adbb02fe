"""Heterogeneous Swarms: the models are the nodes of a directed acyclic graph; a node answers
after its parents, reading their answers, and the sink's answer is the system's. The graph is a
continuous n x n adjacency matrix, decoded into a DAG (see `_graph.decode_dag`), and optimised
on dev by particle swarm optimisation (`_pso.ParticleSwarm`) with dev accuracy as the objective.
Heterogeneous Swarms (Feng et al., 2025), role step only (the paper also optimises weights);
MoCo `text_heterogeneous_swarms.py` with its `NumericSwarm`, whose defaults these are:
5 particles, 5 iterations, inertia 0.2, cognitive 0.3, social 0.4, repel 0.05, step 0.5 decaying
by 0.95 to at least 0.1, patience 5, restart patience 3, a quarter of dev, graph top-p 0.7.

Decoding is stochastic (graph top-p > 0): the reference decoded the best particle afresh for the
test set; here the DAG that earned the best dev score is kept and used at test time, so test
runs the graph that was actually measured.
"""
from __future__ import annotations

import asyncio
from typing import Literal

import numpy as np
from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.strategies.text._graph import decode_dag, parents, waves
from moco_ray.strategies.text._pso import ParticleSwarm, SwarmSettings
from moco_ray.strategies.text._shared import generate_all, listing, user_text, with_user_text
from moco_ray.tasks.base import DevSplit, Example

MIDDLE = ("Answer the question below with the help of the previous responses from other "
          "assistants; feel free to ignore wrong or unhelpful ones.")
LAST = MIDDLE + " Make sure to give a final answer, in the format the question asks for."
NODE = "{instruction}\n\nPrevious responses:\n{previous}\n\nQuestion:\n{question}"


@register("text_heterogeneous_swarms")
class HeterogeneousSwarms(Strategy):
    level = "text"
    summary = "models as a DAG whose edges are optimised on dev by particle swarm search"

    class Params(SamplingFields):
        population: int = Field(5, ge=1, description="particles (graphs) per iteration")
        max_iterations: int = Field(5, ge=1, description="swarm iterations on dev")
        starting_velocity: Literal["random", "zero"] = "random"
        weight_randomness: bool = Field(True, description="random factors on the four pulls")
        inertia: float = Field(0.2, ge=0.0)
        cognitive_coeff: float = Field(0.3, ge=0.0, description="pull to the particle's best")
        social_coeff: float = Field(0.4, ge=0.0, description="pull to the global best")
        repel_coeff: float = Field(0.05, ge=0.0, description="push from the global worst")
        repel_term: bool = True
        step_length: float = Field(0.5, gt=0.0)
        step_length_factor: float = Field(0.95, gt=0.0, le=1.0)
        minimum_step_length: float = Field(0.1, ge=0.0)
        patience: int = Field(5, ge=2, description="stop after this many iterations without a "
                                                   "better global best")
        restart_patience: int = Field(3, ge=2, description="restart a particle after this many "
                                                           "iterations without improving")
        dev_fraction: float = Field(0.25, gt=0.0, le=1.0, description="share of dev used as the "
                                                                      "objective (reference)")
        graph_top_p: float = Field(0.7, ge=0.0, le=1.0, description="nucleus of each decoding "
                                                                    "draw; 0 = argmax")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, n = self.params, len(ctx.models)
        if n < 2:
            raise ValueError(f"text_heterogeneous_swarms needs at least 2 models, the job has "
                             f"{ctx.models}")
        if p.inertia + p.cognitive_coeff + p.social_coeff + p.repel_coeff <= 0:
            raise ValueError("params.inertia, cognitive_coeff, social_coeff and repel_coeff are "
                             "all 0: a particle could not move; make one of them positive")
        limit = max(1, int(len(dev) * p.dev_fraction))
        settings = SwarmSettings(**p.model_dump(include=set(SwarmSettings.__dataclass_fields__)))
        swarm = ParticleSwarm(n * n, settings, np.random.default_rng(ctx.rng.randrange(2**32)))
        best: tuple[float, list[list[int]], list[list[float]]] | None = None
        per_iteration: list[list[float]] = []
        for _ in range(p.max_iterations):
            mats = [x.reshape(n, n) for x in swarm.particles()]
            dags = [decode_dag(m, p.graph_top_p, ctx.rng) for m in mats]
            scores = await asyncio.gather(*(self._dev_score(ctx, dev, limit, d) for d in dags))
            per_iteration.append(list(scores))
            for score, dag, m in zip(scores, dags, mats):
                if best is None or score > best[0]:
                    best = (score, dag, m.tolist())
            if swarm.update(list(scores)):
                break
        assert best is not None
        self.fitted.update(dag=best[1], weights=best[2], dev_score=best[0],
                           initial_best=max(per_iteration[0]), dev_scores=per_iteration,
                           sink=ctx.models[_sink(best[1])])

    async def _dev_score(self, ctx: StrategyContext, dev: DevSplit, limit: int,
                         dag: list[list[int]]) -> float:
        async def one(ectx: ExampleContext, ex: Example) -> float:
            out, _ = await self._run(ectx, ex, dag)
            return ctx.task.score(out, ex)

        scores = await over_dev(ctx, dev, limit, one)
        return sum(scores) / len(scores)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        dag = self.fitted.get("dag")
        if dag is None:
            raise RuntimeError("text_heterogeneous_swarms needs fit(dev) first: it searches "
                               "the graph on dev")
        out, answers = await self._run(ctx, example, dag)
        return Answer(output=out, meta={"dag": dag, "sink": self.fitted["sink"],
                                        "answers": answers})

    async def _run(self, ctx: ExampleContext, example: Example, dag: list[list[int]]
                   ) -> tuple[str, dict[str, str]]:
        """Run the DAG wave by wave: sources answer the task prompt as is, every other node
        reads its parents' answers; returns the sink's answer and every node's."""
        models, base = ctx.models, ctx.task.prompt(example)
        question, sink = user_text(base), _sink(dag)
        outs: dict[int, str] = {}
        for wave in waves(dag):
            jobs = []
            for j in wave:
                ps = parents(dag, j)
                prompt = base if not ps else with_user_text(base, NODE.format(
                    instruction=LAST if j == sink else MIDDLE, question=question,
                    previous=listing([outs[i] for i in ps])))
                jobs.append((models[j], prompt))
            texts = await generate_all(ctx, self.params, jobs, "node")
            outs.update(zip(wave, texts))
        return outs[sink], {models[j]: t for j, t in sorted(outs.items())}


def _sink(dag: list[list[int]]) -> int:
    sinks = [j for j, row in enumerate(dag) if not any(row)]
    assert len(sinks) == 1, f"decoded graph must have one sink, got {sinks}"
    return sinks[0]
