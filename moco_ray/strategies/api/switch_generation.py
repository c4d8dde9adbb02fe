"""Switch Generation: models take turns writing an answer patch by patch; before each patch a
selector (a LoRA adapter over a pool model) picks which model writes it. Feng et al., 2025,
"When One LLM Drools, Multi-LLM Collaboration Rules" / Switch Generation; MoCo
`api_switch_generation.py`.

Selector training (on dev only), as in the reference: for a dev question, a shared prefix of a
random number of patches is written by randomly chosen models; from that prefix `rollouts`
continuations are rolled out, each starting with one model's patch and going on with randomly
chosen models to the end; a rollout's reward is the task metric on dev, or, when
`reward_model` is set, that pool model's judgement (logprob of "Yes" minus "No" for a judge
prompt over the question and the response, the pool-served stand-in for the reference's
Skywork reward model). Each model's utility is the mean reward of the rollouts it started; the
best model (ties: the job's order) becomes the SFT label of the selector prompt (the question,
then each patch so far between "<model i begins>" / "<model i ends>", then "Which model should
generate the next segment? ..."), and the selector adapter is trained with our Ray Train +
DeepSpeed trainer. At test time the selector scores each model's number and the chosen model
writes the next patch, until a patch ends (EOS) or the answer reaches `max_tokens`.

Reference defaults kept (its HEAD): patch size 25 tokens, 500 training instances, 16 rollouts
per instance, temperature 0.7 / top-p 0.9. Departures: rollouts start with each model in turn
(the reference drew the first model at random, so a model could get no rollout); the shared
prefix holds 0 to (patches per answer - 1) patches (the reference: 1 to patches - 3), so short
answers get instances too; patches are joined as written (the reference put a space between
patches) and decoding stops at EOS (the reference always wrote max_response_length / patch_size
patches); instances where every model's utility ties teach nothing and are left out, and when no
instance is left, or all name one model, no selector is trained and that model (else the best by
mean utility) writes every patch; the s1 "Wait," insertion and the "The final answer is" suffix
of the reference are not applied; the selector's choice is the number it finds most likely
(`score`), not parsed from a generation (the reference fell back to a random model); the
selector prompt is one chat user turn both in its SFT rows and when it scores
(`selector_input`; the reference trains TRL prompt/completion rows on the raw text but queries
the trained selector through the chat template); the selector is an adapter over a pool model
(`selector_model`, default the job's first) with small CPU-sized settings, not a separately
fine-tuned Qwen2.5-7B (LoRA r=64, lr 1e-5, 5 epochs).
"""
from __future__ import annotations

import asyncio
import math
import random

from pydantic import Field

from moco_ray.records import Prompt, SamplingParams
from moco_ray.strategies.api._patches import (
    AdapterFields,
    chat_row,
    check_model,
    ended,
    label_prompt,
    labels,
    pick_label,
    question_of,
    train_one,
    write_patch,
)
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import DEV_CONCURRENCY, SamplingFields
from moco_ray.tasks.base import DevSplit, Example

JUDGE_PROMPT = ("Question: {question}\n\nResponse: {response}\n\nIs the response a correct answer "
                "to the question? Answer Yes or No.")


def selector_prompt(question: str, segments: list[tuple[int, str]], n: int) -> str:
    """The reference's selector prompt: the question, the patches so far with their writers."""
    text = question
    for i, seg in segments:
        text += f" <model {i} begins> {seg} <model {i} ends>"
    return (text + " Which model should generate the next segment? Please respond with a number "
            f"from 0 to {n - 1}. The answer is model ")


def selector_input(question: str, segments: list[tuple[int, str]], n: int) -> Prompt:
    """The selector's input, the same in its SFT rows and when it scores the model numbers."""
    return label_prompt(selector_prompt(question, segments, n))


@register("api_switch_generation")
class SwitchGeneration(Strategy):
    level = "api"
    summary = "a selector trained on dev rollouts picks which model writes each next patch"

    class Params(SamplingFields, AdapterFields):
        patch_tokens: int = Field(25, ge=1, description="tokens per patch (reference "
                                                        "patch_size)")
        selector_model: str | None = Field(None, description="pool model the selector adapter "
                                                             "is trained over (None: the first)")
        training_instances: int = Field(500, ge=1, description="(dev question, prefix) "
                                                               "instances to label")
        rollouts: int = Field(16, ge=1, description="rollouts per instance, started by each "
                                                    "model in turn (at least one per model)")
        reward_model: str | None = Field(None, description="pool model judging rollouts (None: "
                                                           "the task metric on dev)")
        dev_size: int | None = Field(None, ge=1, description="dev questions to draw instances "
                                                             "from (None: all)")

    # --- fit -----------------------------------------------------------------------------------

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, models = self.params, ctx.models
        if len(models) < 2:
            raise ValueError(f"api_switch_generation needs at least 2 models; the job has {models}")
        if p.rollouts < len(models):
            raise ValueError(f"params.rollouts={p.rollouts} is fewer than the {len(models)} "
                             "models; each model must start at least one rollout, so set "
                             f"rollouts >= {len(models)}")
        selector = check_model(p.selector_model, "selector_model", models, models[0])
        if p.reward_model is not None and p.reward_model not in ctx.pool.models:
            raise ValueError(f"params.reward_model={p.reward_model!r} is not a pool model "
                             f"{ctx.pool.models}")
        examples = list(dev.examples[:p.dev_size] if p.dev_size else dev.examples)
        if not examples:
            raise ValueError(f"dev split of task {dev.task!r} is empty; the selector trains on dev")
        order = list(examples)
        ctx.rng.shuffle(order)
        instances = [(order[i % len(order)], i) for i in range(p.training_instances)]
        sem = asyncio.Semaphore(DEV_CONCURRENCY)

        async def run(ex: Example, i: int):
            async with sem:
                return await self._instance(ctx.example(ex), ex,
                                            random.Random(f"{ctx.seed}:{ex.id}:{i}"))

        results = await asyncio.gather(*(run(ex, i) for ex, i in instances))
        names = labels(len(models))
        rows, taught = [], set()
        mean_utility = [0.0] * len(models)
        for segments, utility, question in results:
            for j, u in enumerate(utility):
                mean_utility[j] += u / len(results)
            if max(utility) > min(utility):
                k = max(range(len(models)), key=lambda j: (utility[j], -j))
                taught.add(k)
                rows.append(chat_row(selector_input(question, segments, len(models)), names[k]))
        best = max(range(len(models)), key=lambda j: (mean_utility[j], -j))
        self.fitted.update(selector=selector, adapter=None, train_rows=len(rows),
                           mean_utility=dict(zip(models, mean_utility)),
                           labels=[r["messages"][-1]["content"] for r in rows])
        if not taught:
            self.fitted.update(fallback=models[best], reason="no rollout separates the models")
        elif len(taught) == 1:
            self.fitted.update(fallback=models[taught.pop()],
                               reason="every informative instance names one model")
        else:
            self.fitted["adapter"] = await train_one(ctx, "selector", selector, rows, p)

    async def _instance(self, ectx: ExampleContext, ex: Example, rng: random.Random):
        """One training instance: a random shared prefix, then rollouts started by each model.
        Returns (prefix segments, per-model utility, question text)."""
        p, models, task = self.params, ectx.models, ectx.task
        prompt = task.prompt(ex)
        budget = p.max_tokens or task.max_tokens
        patches = math.ceil(budget / p.patch_tokens)
        segments: list[tuple[int, str]] = []
        text, used = "", 0
        for _ in range(rng.randrange(patches)):
            k = rng.randrange(len(models))
            g = await write_patch(ectx, models[k], prompt, text, p.sampling(task, rng),
                                  min(p.patch_tokens, budget - used), "prefix")
            if ended(g) or used + g.completion_tokens >= budget:
                break  # an ended prefix leaves nothing to choose; keep the patches before it
            segments.append((k, g.text))
            text += g.text
            used += g.completion_tokens
        # Every random choice is drawn here, before any rollout runs, so the instance does not
        # depend on the order in which concurrent calls finish.
        plans = [([i % len(models)] + [rng.randrange(len(models)) for _ in range(patches)],
                  [p.sampling(task, rng) for _ in range(patches + 1)])
                 for i in range(p.rollouts)]
        finals = await asyncio.gather(*(self._rollout(ectx, prompt, text, used, budget, *plan)
                                        for plan in plans))
        rewards = await asyncio.gather(*(self._reward(ectx, ex, prompt, out) for out in finals))
        utility = []
        for j in range(len(models)):
            mine = [r for (picks, _), r in zip(plans, rewards) if picks[0] == j]
            utility.append(sum(mine) / len(mine))
        return segments, utility, question_of(prompt)

    async def _rollout(self, ectx: ExampleContext, prompt: Prompt, text: str, used: int,
                       budget: int, picks: list[int], params: list[SamplingParams]) -> str:
        p = self.params
        for k, sp in zip(picks, params):
            if used >= budget:
                break
            g = await write_patch(ectx, ectx.models[k], prompt, text, sp,
                                  min(p.patch_tokens, budget - used), "rollout")
            text += g.text
            used += g.completion_tokens
            if ended(g):
                break
        return text

    async def _reward(self, ectx: ExampleContext, ex: Example, prompt: Prompt,
                      response: str) -> float:
        judge = self.params.reward_model
        if judge is None:
            return ectx.task.score(response, ex)
        ask = [{"role": "user", "content": JUDGE_PROMPT.format(question=question_of(prompt),
                                                               response=response)}]
        yes, no = await ectx.score(judge, ask, ["Yes", "No"], step="reward")
        return yes.sum_logprob - no.sum_logprob

    # --- solve ---------------------------------------------------------------------------------

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "selector" not in self.fitted:
            raise RuntimeError("api_switch_generation needs fit(dev) first: it trains the "
                               "selector on dev rollouts")
        p, models = self.params, ctx.models
        prompt = ctx.task.prompt(example)
        question = question_of(prompt)
        budget = p.max_tokens or ctx.task.max_tokens
        names = labels(len(models))
        segments: list[tuple[int, str]] = []
        text, used = "", 0
        while used < budget:
            if self.fitted["adapter"] is None:
                k = models.index(self.fitted["fallback"])
            else:
                k, _ = await pick_label(ctx, self.fitted["selector"],
                                        selector_input(question, segments, len(models)), names,
                                        self.fitted["adapter"], step="select")
            g = await write_patch(ctx, models[k], prompt, text, p.sampling(ctx.task, ctx.rng),
                                  min(p.patch_tokens, budget - used), f"patch{len(segments)}")
            segments.append((k, g.text))
            text += g.text
            used += g.completion_tokens
            if ended(g):  # also when nothing was generated, so the loop always progresses
                break
        return Answer(output=text, meta={"writers": [models[k] for k, _ in segments],
                                         "patches": [s for _, s in segments],
                                         "selector": self.fitted["selector"],
                                         "fallback": self.fitted["adapter"] is None})
