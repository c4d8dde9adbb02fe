"""Multiagent finetuning: a society of agents debates on dev; each agent is then fine-tuned twice,
as a *generation* agent on its own first-round answers that agree with the debate's consensus and
as a *critic* agent on its own final-round answers that agree with it (the corrections of a wrong
first answer, DC-, mixed with the kept right ones, DC+, in proportion `w`). At test the agents
debate again, round 1 with the generation adapters and every later round with the critic adapters,
and the majority of the final round answers.

Subramaniam et al., 2025, "Multiagent Finetuning: Self Improvement with Diverse Reasoning Chains"
(ICLR 2025); MoCo `text_multiagent_finetuning.py`. Agents are the job's models (cycled to reach
`agents`, so one model gives N copies as in the paper); each agent gets its own LoRA adapters
(Ray Train + DeepSpeed through `train_adapters`), served per request from the live deployments
(the models need `enable_lora: true` and the vllm engine).

Departures, each deliberate:
- The paper's critic reads an LM-written summary of the other agents' answers; here (as in the
  reference) it reads them listed, next to its own previous answer.
- A critic learns its own final-round response to the critic prompt it really saw (the paper's
  y_{M,n}); the reference taught every critic the same "representative" consensus text behind a
  history prompt that differs from the prompt used at test.
- `w` is applied by repetition: both DC- and DC+ are kept whole and the lighter side is repeated
  until the mix is w : 1-w (the reference subsampled both sides, which drops data). When one side
  is empty and 0 < w < 1, the other is used alone.
- Fine-tuning is LoRA (adapters r=8), not full fine-tuning, with the adapter defaults of
  `moco_ray.training.service` (lr 1e-3); an agent with no rows keeps its previous weights
  (the base model or the last iteration's adapter), as in the reference.
- With `iterations` > 1 each iteration debates with the previous adapters, and its new adapters
  train from the pool model's weights (adapters do not stack) on the new debate's data.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from pydantic import Field

from moco_ray.records import ChatMessage, Prompt
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.strategies.text._shared import answer_of, listing, user_text, with_user_text
from moco_ray.strategies.training import adapter_config, train_adapters
from moco_ray.tasks.base import DevSplit, Example

CRITIC = (
    "You are one of several agents answering the same question. Read the other agents' answers "
    "from the last round, check your own previous answer against them, and answer again.\n\n"
    "Question:\n{question}\n\nYour previous answer:\n{own}\n\n"
    "Other agents' answers:\n{others}\n\n"
    "Give your updated answer to the question, in the format the question asks for."
)

# One agent's turn of a debate: the prompt it saw, what it said, the answer extracted from it.
AgentTurn = dict  # {"prompt": Prompt, "text": str, "answer": str}


@register("text_multiagent_finetuning")
class MultiagentFinetuning(Strategy):
    level = "text"
    summary = ("agents debate on dev; each is LoRA-tuned as generator and critic on its own "
               "consensus-agreeing answers; tuned agents debate at test, majority wins")

    class Params(SamplingFields):
        agents: int | None = Field(
            None, ge=1, description="agents in the debate, the job's models cycled (None: one "
                                    "per model, at least 3, the paper's count)")
        rounds: int = Field(2, ge=1, description="debate rounds: round 1 generates, every later "
                                                 "one critiques (paper and reference: 2)")
        iterations: int = Field(1, ge=1, description="debate -> fine-tune cycles on dev "
                                                     "(reference: 1)")
        w: float = Field(0.5, ge=0.0, le=1.0,
                         description="share of the critic data taken from corrections (DC-: "
                                     "wrong first answer, consensus at the end); 1 - w from "
                                     "kept answers (DC+) (reference: 0.5)")
        dev_size: int | None = Field(None, ge=1, description="dev examples debated to build "
                                                              "the data (None: all)")
        train_steps: int = Field(60, ge=1, description="optimizer steps per adapter")
        train_lr: float = Field(1e-3, gt=0.0, description="LoRA learning rate")
        train_batch_size: int = Field(4, ge=1, description="rows per optimizer step")
        lora_r: int = Field(8, ge=1, description="LoRA rank of every adapter")

    # -- fit: debate on dev, build each agent's data, train its adapters ------------------------
    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        agents = self._agents(ctx.models)
        gen: list[str | None] = [None] * len(agents)
        critic: list[str | None] = [None] * len(agents)
        cfg = adapter_config(max_steps=p.train_steps, lr=p.train_lr,
                             batch_size=p.train_batch_size, lora_r=p.lora_r,
                             lora_alpha=2.0 * p.lora_r, seed=ctx.seed)
        log: list[dict] = []
        for it in range(p.iterations):
            async def one(ectx: ExampleContext, ex: Example, gen=tuple(gen),
                          critic=tuple(critic)) -> tuple[list[list[AgentTurn]], str | None]:
                rounds = await self._debate(ectx, ex, agents, gen, critic)
                return rounds, consensus([t["answer"] for t in rounds[-1]], ectx.rng)

            debates = await over_dev(ctx, dev, p.dev_size, one)
            data = build_datasets(debates, len(agents), p.rounds)
            jobs: dict[str, tuple[str, list[dict]]] = {}
            mixed = []
            for i, model in enumerate(agents):
                if data["generation"][i]:
                    jobs[f"gen{i}"] = (model, fill(data["generation"][i], cfg.rows_per_step))
                rows = mix_critic(data["minus"][i], data["plus"][i], p.w)
                mixed.append(len(rows))
                if rows:
                    jobs[f"critic{i}"] = (model, fill(rows, cfg.rows_per_step))
            paths = await train_adapters(ctx, jobs, cfg) if jobs else {}
            for i in range(len(agents)):  # no rows: the agent keeps what it had
                gen[i] = paths.get(f"gen{i}", gen[i])
                critic[i] = paths.get(f"critic{i}", critic[i])
            log.append({
                "iteration": it,
                "consensus_found": sum(c is not None for _, c in debates),
                # How often the dev consensus is right: a diagnostic only (training uses the
                # consensus, never the reference).
                "consensus_dev_accuracy": sum(
                    ctx.task.metric(c, ex) for (_, c), ex in zip(debates, dev.examples)
                    if c is not None) / len(debates),
                "generation_rows": [len(r) for r in data["generation"]],
                "critic_minus_rows": [len(r) for r in data["minus"]],
                "critic_plus_rows": [len(r) for r in data["plus"]],
                "critic_rows": mixed,
            })
        self.fitted.update({"agents": agents, "generation_adapters": gen,
                            "critic_adapters": critic, "iterations": log})

    # -- solve: debate with the adapters, majority of the final round ---------------------------
    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "agents" not in self.fitted:
            raise RuntimeError("text_multiagent_finetuning needs fit(dev) first: it trains each "
                               "agent's generation and critic adapters on dev debates")
        agents = self.fitted["agents"]
        if [m for m in agents if m not in ctx.models]:
            raise RuntimeError(f"fitted agents {agents} are not all among this job's models "
                               f"{ctx.models}; fit again on these models")
        gen, critic = self.fitted["generation_adapters"], self.fitted["critic_adapters"]
        rounds = await self._debate(ctx, example, agents, gen, critic)
        final = rounds[-1]
        winner = consensus([t["answer"] for t in final], ctx.rng)
        pick = next((t for t in final if t["answer"] == winner), final[0])
        return Answer(output=pick["text"], meta={
            "winner": winner, "votes": dict(Counter(t["answer"] for t in final if t["answer"])),
            "rounds": [[t["text"] for t in r] for r in rounds], "agents": agents})

    # -- the debate ------------------------------------------------------------------------------
    def _agents(self, models: list[str]) -> list[str]:
        n = self.params.agents
        if n is None:
            n = max(3, len(models))
        if n < len(models):
            raise ValueError(f"params.agents={n} is fewer than the job's {len(models)} models "
                             f"{models}; every model takes part, so set agents >= {len(models)} "
                             "(or None) or give the job fewer models")
        return [models[i % len(models)] for i in range(n)]

    async def _debate(self, ctx: ExampleContext, example: Example, agents: list[str],
                      gen: Sequence[str | None], critic: Sequence[str | None]
                      ) -> list[list[AgentTurn]]:
        """Every round's turns, one per agent; round r > 0 sees round r - 1. Round 0 uses the
        generation adapters, later rounds the critic adapters (None: the model as served)."""
        p, base = self.params, ctx.task.prompt(example)
        question = user_text(base)
        history: list[list[AgentTurn]] = []
        for r in range(p.rounds):
            if r == 0:
                prompts = [base] * len(agents)
            else:
                last = history[-1]
                prompts = [with_user_text(base, CRITIC.format(
                    question=question, own=last[i]["text"].strip(),
                    others=listing([t["text"] for j, t in enumerate(last) if j != i])))
                    for i in range(len(agents))]
            adapters = gen if r == 0 else critic
            params = [p.sampling(ctx.task, ctx.rng) for _ in agents]  # seeds in agent order
            calls = []
            for i, (model, prompt, sp) in enumerate(zip(agents, prompts, params)):
                step = f"{'generate' if r == 0 else 'critic'}{r}:agent{i}"
                if adapters[i] is None:
                    calls.append(ctx.generate(model, prompt, sp, step=step))
                else:
                    calls.append(ctx.generate_lora(model, adapters[i], prompt, sp, step=step))
            gens = await asyncio.gather(*calls)
            history.append([{"prompt": prompt, "text": g.text,
                             "answer": answer_of(ctx.task, g.text, example)}
                            for prompt, [g] in zip(prompts, gens)])
        return history


def consensus(answers: list[str], rng) -> str | None:
    """Majority of the non-empty answers; a tie is broken by `rng` (seeded); None when no agent
    gave a parseable answer."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None
    top = max(counts.values())
    tied = sorted(a for a, c in counts.items() if c == top)
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def _chat(prompt: Prompt, reply: str) -> dict:
    msgs: list[ChatMessage] = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                               else [dict(m) for m in prompt])
    return {"messages": [*msgs, {"role": "assistant", "content": reply}]}


def build_datasets(debates: list[tuple[list[list[AgentTurn]], str | None]], n_agents: int,
                   rounds: int) -> dict[str, list[list[dict]]]:
    """Per-agent SFT rows from dev debates `(rounds of turns, consensus)`:
    generation[i]: agent i's first-round (prompt, reply) where its answer is the consensus;
    minus[i] / plus[i]: its final-round (critic prompt, reply) where the final answer is the
    consensus, split by whether its first answer was wrong (DC-) or already right (DC+).
    With one round there are no critic rounds, hence no critic rows."""
    out: dict[str, list[list[dict]]] = {k: [[] for _ in range(n_agents)]
                                        for k in ("generation", "minus", "plus")}
    for turns, agreed in debates:
        if agreed is None:  # nobody answered: nothing to agree with
            continue
        first, last = turns[0], turns[-1]
        for i in range(n_agents):
            if first[i]["answer"] == agreed:
                out["generation"][i].append(_chat(first[i]["prompt"], first[i]["text"]))
            if rounds > 1 and last[i]["answer"] == agreed:
                side = "plus" if first[i]["answer"] == agreed else "minus"
                out[side][i].append(_chat(last[i]["prompt"], last[i]["text"]))
    return out


def mix_critic(minus: list[dict], plus: list[dict], w: float) -> list[dict]:
    """The critic's rows: DC- and DC+ in proportion w : 1 - w, by repeating the side that falls
    short (cycling through it) so that no row is dropped. w = 0 keeps DC+ only, w = 1 DC- only;
    with 0 < w < 1 and one side empty, the other side is used alone."""
    if w == 0.0:
        return list(plus)
    if w == 1.0:
        return list(minus)
    if not minus or not plus:
        return list(minus or plus)
    # Smallest counts with n_minus >= |DC-|, n_plus >= |DC+| and n_minus / n_plus = w / (1 - w).
    n_minus = max(len(minus), round(len(plus) * w / (1 - w)))
    n_plus = max(len(plus), round(len(minus) * (1 - w) / w))
    return ([minus[k % len(minus)] for k in range(n_minus)]
            + [plus[k % len(plus)] for k in range(n_plus)])


def fill(rows: list[dict], n: int) -> list[dict]:
    """`rows`, cycled up to at least `n` (one optimizer step's worth): a small dev set can leave
    an agent fewer rows than a batch, and the trainer needs one full step."""
    return [rows[k % len(rows)] for k in range(max(n, len(rows)))]
