"""Structure: the models talk along a fixed topology. Every model answers; then, for a few
rounds, each model revises its answer after reading its neighbours' answers from the round
before (all at once: synchronous rounds); a model nobody sends to keeps its answer. The best
single model on dev gives the final answer (its last one). Topologies of multi-agent debate in
the manner of "Exchange-of-Thought" (Yin et al., 2023) and network-topology studies of LLM
collaboration; MoCo `text_structure.py`: 3 rounds, structure chain / tree / star / circle /
complete / custom (its 'other'). The reference's 'star' also links the spokes in a ring; that
graph is 'wheel' here, and 'star' is hub-and-spoke.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields
from moco_ray.strategies.text._graph import Topology, parents, topology
from moco_ray.strategies.text._shared import (
    choose_model,
    fitted_model,
    generate_all,
    listing,
    user_text,
    with_user_text,
)
from moco_ray.tasks.base import DevSplit, Example

UPDATE = (
    "Question:\n{question}\n\nYour previous answer:\n{own}\n\n"
    "Answers from other assistants:\n{others}\n\n"
    "Consider the other answers carefully and give your updated answer to the question, in the "
    "format the question asks for."
)


@register("text_structure")
class Structure(Strategy):
    level = "text"
    summary = "models revise their answers over rounds, each reading its neighbours in a graph"

    class Params(SamplingFields):
        structure: Topology = Field("star", description="chain, tree, star, wheel, circle, "
                                                        "complete, or custom (reference example: "
                                                        "star)")
        adjacency: list[list[int]] | None = Field(
            None, description="structure='custom': n x n 0/1 matrix in job model order; "
                              "adjacency[i][j] = 1 means model j reads model i")
        rounds: int = Field(3, ge=1, description="answer rounds, the first without neighbours "
                                                 "(reference: 3)")
        final_model: str | None = Field(None, description="model whose last answer is final; "
                                                          "None: the best on dev (reference)")
        dev_size: int | None = Field(None, ge=1, description="dev examples to choose the final "
                                                              "model on (None: all)")

        @field_validator("adjacency")
        @classmethod
        def _zero_one(cls, adj):
            if adj is None:
                return adj
            bad = sorted({v for row in adj for v in row} - {0, 1})
            if bad:
                raise ValueError(f"adjacency may hold only 0 and 1, got {bad}")
            loops = [i for i, row in enumerate(adj) if i < len(row) and row[i]]
            if loops:
                raise ValueError(f"adjacency has self-loops at {loops}; a model always sees its "
                                 "own previous answer, set the diagonal to 0")
            return adj

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        self.fitted["adjacency"] = self._graph(len(ctx.models))
        await choose_model(self, ctx, dev, p.final_model, "final_model", p.dev_size)

    def _graph(self, n: int) -> list[list[int]]:
        p = self.params
        if p.adjacency is not None and p.structure != "custom":
            raise ValueError(f"params.adjacency is given but structure={p.structure!r}; set "
                             "structure='custom' to use it, or drop it")
        return topology(p.structure, n, p.adjacency)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        final = fitted_model(self, "final_model")
        p, models = self.params, ctx.models
        adj = self._graph(len(models))
        base = ctx.task.prompt(example)
        question = user_text(base)
        answers = dict(zip(models, await generate_all(ctx, p, [(m, base) for m in models],
                                                      "round0")))
        history = [answers]
        for r in range(1, p.rounds):
            jobs = [(models[j], with_user_text(base, UPDATE.format(
                question=question, own=answers[models[j]],
                others=listing([answers[models[i]] for i in parents(adj, j)]))))
                for j in range(len(models)) if parents(adj, j)]
            texts = await generate_all(ctx, p, jobs, f"round{r}")
            answers = {**answers, **{m: t for (m, _), t in zip(jobs, texts)}}
            history.append(answers)
        return Answer(output=answers[final], meta={"final_model": final, "adjacency": adj,
                                                   "rounds": history})
