"""AggLM (Zhao et al. 2025, "The Majority is not always right: RL training for solution
aggregation"); MoCo `text_agglm.py`.

An aggregator model reads K candidate solutions to a problem and writes the final one. On dev:
every pool model answers each problem `sample_size` times, giving `sample_size` sets of one
candidate per model; a set is 'hard' when its majority answer is wrong, 'easy' otherwise; all
hard sets and `easy_per_hard` easy sets per hard one (the reference: as many easy as hard) make
the training prompts; the aggregator gets a LoRA adapter trained with GRPO (TRL GRPOTrainer in
Ray Train + DeepSpeed; groups of `num_generations` aggregations sampled in the worker; reward =
the task's metric of the aggregated answer). At test, every pool model answers once and the
aggregator, with its adapter, aggregates.

Defaults are the reference's (lr 1e-4, weight decay 1e-5, 1 epoch, group size 4 = batch 4,
sample_size 2) except: LoRA r 8 (alpha 16, dropout 0.1, the attention projections) instead of
r 64, since vLLM serves adapters of rank <= 16 here; a constant learning rate (the reference:
cosine with 10% warmup); when dev yields no hard set at all, every easy set trains (the
reference's mix would be empty). The aggregator is a pool model (default: the job's first), so
it can serve its adapter per request; the reference loads a separate `agg_model`.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from pydantic import Field, model_validator

from moco_ray.config.distill import GRPOSettings
from moco_ray.records import Prompt
from moco_ray.strategies import training
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.strategies.text._shared import answer_of, check_model, user_text, with_user_text
from moco_ray.strategies.training import adapter_config
from moco_ray.tasks.base import DevSplit, Example, Task

AGGREGATE = (
    "A problem and several candidate solutions to it follow. The candidates may disagree and "
    "any of them may be wrong, the majority included. Check their reasoning, keep what is "
    "right, fix what is wrong, and write one final solution.\n\nProblem:\n{question}\n\n"
    "{candidates}\n\nWrite your final solution, ending with the answer in the format the "
    "problem asks for."
)


def aggregation_prompt(base: Prompt, candidates: list[str]) -> Prompt:
    """The task prompt with its question replaced by the aggregation request (system messages,
    hence the answer format, kept)."""
    listed = "\n\n".join(f"Candidate solution {i + 1}:\n{c.strip()}"
                         for i, c in enumerate(candidates))
    return with_user_text(base, AGGREGATE.format(question=user_text(base), candidates=listed))


def majority_correct(task: Task, example: Example, candidates: list[str]) -> bool:
    """Whether the set's most frequent extracted answer (first seen on ties) is right, i.e.
    scores at least 0.5 under the task metric; a set without any answer counts as wrong."""
    answers = [answer_of(task, c, example) for c in candidates]
    counts = Counter(a for a in answers if a)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(a for a in answers if a and counts[a] == top)
    return task.score(candidates[answers.index(winner)], example) >= 0.5


class TaskReward:
    """GRPO reward: the task's metric of the aggregated answer, for the row's dev example.
    Holds only the dev examples it rewards (it travels to the training workers)."""

    def __init__(self, task: Task, examples: list[Example]):
        self.extract, self.metric = task.extract, task.metric
        self.examples = {ex.id: ex for ex in examples}
        self.__name__ = f"{task.name}_metric"

    def __call__(self, completion: str, row: dict) -> float:
        ex = self.examples[row["example_id"]]
        return float(self.metric(self.extract(completion, ex), ex))


async def train_grpo(ctx: StrategyContext, name: str, model: str, rows: list[dict],
                     reward: TaskReward, cfg, settings) -> str:
    """GRPO-train one adapter of pool model `model` from the weights it serves now (the job's
    trainer); charged to the job's cost as train:<name>. Returns the adapter dir."""
    return await training.train_grpo(ctx, name, model, rows, reward, cfg, settings)


@register("text_agglm")
class AggLM(Strategy):
    level = "text"
    summary = ("an aggregator reads every model's solution and writes the final one; it is "
               "GRPO-trained on dev with the task metric as reward")

    class Params(SamplingFields):
        aggregator: str | None = Field(None, description="pool model that aggregates (None: "
                                                         "the job's first model)")
        sample_size: int = Field(2, ge=1, description="candidate sets per dev problem "
                                                      "(reference: 2)")
        easy_per_hard: float = Field(1.0, ge=0.0, description="easy sets kept per hard set "
                                                              "(reference: 1, a 50/50 mix)")
        dev_size: int | None = Field(None, ge=1, description="dev problems used (None: all)")
        aggregator_max_tokens: int | None = Field(
            512, ge=1, description="aggregation length (reference max_response_length 512); "
                                   "None: the task's")
        lr: float = Field(1e-4, gt=0, description="GRPO learning rate (reference)")
        weight_decay: float = Field(1e-5, ge=0, description="reference: 1e-5")
        epochs: int = Field(1, ge=1, description="passes over the training sets (reference 1)")
        max_steps: int | None = Field(None, ge=1, description="optimizer steps (None: epochs)")
        num_generations: int = Field(4, ge=2, description="GRPO group size (reference: 4)")
        batch_size: int = Field(4, ge=1, description="completions per step and worker "
                                                     "(reference: 4 = one group)")
        kl_beta: float = Field(0.0, ge=0.0, description="KL weight (the reference keeps TRL's "
                                                        "default, 0)")
        epsilon: float = Field(0.2, gt=0, lt=1, description="GRPO ratio clipping")
        grpo_temperature: float = Field(1.0, gt=0, description="sampling temperature in GRPO")
        lora_r: int = Field(8, ge=1, le=16, description="LoRA rank (vLLM serves rank <= 16)")
        lora_alpha: float = Field(16.0, gt=0, description="reference: 16")
        lora_dropout: float = Field(0.1, ge=0, lt=1, description="reference: 0.1")
        num_workers: int = Field(1, ge=1, description="Ray Train workers")

        @model_validator(mode="after")
        def _groups(self):
            if self.batch_size % self.num_generations:
                raise ValueError(f"batch_size={self.batch_size} must be a multiple of "
                                 f"num_generations={self.num_generations} (GRPO samples whole "
                                 "groups); fix: batch_size=num_generations")
            return self

    def grpo_config(self, max_tokens: int, seed: int = 0):

        p = self.params
        cfg = adapter_config(
            lr=p.lr, weight_decay=p.weight_decay, epochs=p.epochs, max_steps=p.max_steps,
            batch_size=p.batch_size, lora_r=p.lora_r, lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            num_workers=p.num_workers, report_every=10, max_seq_len=4096, seed=seed)
        settings = GRPOSettings(num_generations=p.num_generations, kl_beta=p.kl_beta,
                                epsilon=p.epsilon, max_completion_length=max_tokens,
                                temperature=p.grpo_temperature, top_p=1.0)
        return cfg, settings

    def _aggregator(self, ctx_models: list[str], pool_models: list[str]) -> str:
        return check_model(self.params.aggregator or ctx_models[0], pool_models, "aggregator")

    def _agg_tokens(self, task: Task) -> int:
        return self.params.aggregator_max_tokens or self.params.max_tokens or task.max_tokens

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        agg = self._aggregator(ctx.models, ctx.pool.models)
        sets = await self.candidate_sets(ctx, dev)
        hard = [s for s in sets if not s["majority_correct"]]
        easy = [s for s in sets if s["majority_correct"]]
        if hard:
            n_easy = min(len(easy), round(len(hard) * p.easy_per_hard))
            chosen = hard + ctx.rng.sample(easy, n_easy)
        else:
            chosen = easy
        rows = [{"prompt": aggregation_prompt(ctx.task.prompt(s["example"]), s["candidates"]),
                 "example_id": s["example"].id} for s in chosen]
        rows = [r if isinstance(r["prompt"], list) else
                {**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
        ctx.rng.shuffle(rows)
        examples = list({s["example"].id: s["example"] for s in chosen}.values())
        cfg, settings = self.grpo_config(self._agg_tokens(ctx.task), ctx.seed)
        adapter = await train_grpo(ctx, f"agglm-{agg}", agg, rows,
                                   TaskReward(ctx.task, examples), cfg, settings)
        self.fitted.update({"aggregator": agg, "adapter": adapter, "sets": len(sets),
                            "hard": len(hard), "easy": len(easy), "trained_on": len(rows)})

    async def candidate_sets(self, ctx: StrategyContext, dev: DevSplit) -> list[dict[str, Any]]:
        """Per dev problem, `sample_size` sets of one sampled solution per model, each marked
        by whether its majority answer is right."""
        p = self.params

        async def one(ectx: ExampleContext, ex: Example) -> list[dict[str, Any]]:
            prompt = ctx.task.prompt(ex)
            calls = [(m, p.sampling(ctx.task, ectx.rng)) for _ in range(p.sample_size)
                     for m in ctx.models]
            gens = await asyncio.gather(*(ectx.generate(m, prompt, sp, step="dev_candidate")
                                          for m, sp in calls))
            texts = [g.text for [g] in gens]
            k = len(ctx.models)
            out = []
            for s in range(p.sample_size):
                cands = texts[s * k:(s + 1) * k]
                out.append({"example": ex, "candidates": cands,
                            "majority_correct": majority_correct(ctx.task, ex, cands)})
            return out

        per_ex = await over_dev(ctx, dev, p.dev_size, one)
        return [s for sets in per_ex for s in sets]

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        p = self.params
        adapter = self.fitted.get("adapter")
        if adapter is None:
            raise RuntimeError("text_agglm needs fit(dev) first: it GRPO-trains the aggregator")
        agg = self.fitted["aggregator"]
        base = ctx.task.prompt(example)
        sps = [p.sampling(ctx.task, ctx.rng) for _ in ctx.models]
        gens = await asyncio.gather(*(ctx.generate(m, base, sp, step="candidate")
                                      for m, sp in zip(ctx.models, sps)))
        cands = [g.text for [g] in gens]
        sp = p.model_copy(update={"max_tokens": self._agg_tokens(ctx.task)}).sampling(
            ctx.task, ctx.rng)
        [final] = await ctx.generate_lora(agg, adapter, aggregation_prompt(base, cands), sp,
                                          step="aggregate")
        return Answer(output=final.text, meta={"candidates": dict(zip(ctx.models, cands)),
                                               "aggregator": agg, "adapter": adapter})
