"""Blackboard multi-agent system: agents (the pool's models) share a blackboard. Each iteration
a control step picks who acts; an acting agent reads the board, chooses an action (propose a
strategy, execute a step, critique, or terminate with a final solution) and writes an entry.
The run ends when enough agents chose to terminate (or after `max_iterations`); a decider
concludes from the last iteration's final solutions. bMAS (Han & Zhang, "Exploring Advanced LLM
Multi-Agent Systems Based on Blackboard Architecture", 2025); MoCo `text_bbmas.py`, whose
defaults these are: 10 iterations, 1 agent acting per iteration chosen at random, 1 terminate
request ends the run, 3 tries to get a parseable action, and the agents vote when there are
several final solutions.

Options beyond the reference: `control='llm'` lets the main model pick who acts (the paper's
control unit), `decider='dev_best'` lets the main model write the final answer from the board
(the paper's decider agent). The reference ran every agent on the best dev model (it loaded one
model for all); `agent_models='dev_best'` does that, the default gives each agent its own model.

Not reproduced from the reference: a turn whose agent names no action in its tries writes the
placeholder "INVALID ACTION", which could end up on the board agents read and as the answer (on
SmolLM2-135M every turn did: 0.00 on ARC). Here such turns stay in the trace only, action
phrases match in any letter case, and when the last iteration holds no usable entry one model
(the main model, else the job's first) concludes from the board.
"""
from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from typing import Literal

from pydantic import Field, model_validator

from moco_ray.records import Prompt
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields
from moco_ray.strategies.text import _bbmas_prompts as P
from moco_ray.strategies.text._shared import (
    choose_model,
    fitted_model,
    plain,
    user_text,
    with_user_text,
)
from moco_ray.tasks.base import DevSplit, Example

Entry = dict  # {"id": int, "iteration": int, "agent": int, "text": str}
# The board entry of a turn whose agent named no action in its tries (kept in the trace; agents
# do not see it, and it is never a conclusion).
INVALID = "INVALID ACTION"


@register("text_bbmas")
class Blackboard(Strategy):
    level = "text"
    summary = "agents take turns writing on a shared blackboard until one concludes"

    class Params(SamplingFields):
        max_iterations: int = Field(10, ge=1, description="iterations at most (reference: 10)")
        agents_per_iteration: int = Field(1, ge=1, description="agents acting per iteration "
                                                               "(reference: 1)")
        min_agents_to_stop: int = Field(1, ge=1, description="terminate requests in one "
                                                             "iteration that end the run")
        max_retries: int = Field(3, ge=1, description="tries to get a parseable action choice "
                                                      "(one at temperature 0)")
        control: Literal["random", "llm"] = Field(
            "random", description="who acts: seeded random draw (reference) or the main model")
        decider: Literal["vote", "dev_best"] = Field(
            "vote", description="final answer: agents vote among final solutions (reference) "
                                "or the main model answers from the board")
        agent_models: Literal["own", "dev_best"] = Field(
            "own", description="agent k runs on the job's model k, or all on the main model")
        main_model: str | None = Field(None, description="model for control / decider / "
                                                         "agents when they need one; None: the "
                                                         "best single model on dev")
        dev_size: int | None = Field(None, ge=1, description="dev examples to choose the main "
                                                              "model on (None: all)")

        @model_validator(mode="after")
        def _can_stop(self):
            if self.min_agents_to_stop > self.agents_per_iteration:
                raise ValueError(f"min_agents_to_stop={self.min_agents_to_stop} exceeds "
                                 f"agents_per_iteration={self.agents_per_iteration}: the run "
                                 "could never stop early; lower it")
            return self

    def _needs_main(self) -> bool:
        p = self.params
        return p.control == "llm" or "dev_best" in (p.decider, p.agent_models)

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        if self._needs_main():
            await choose_model(self, ctx, dev, p.main_model, "main_model", p.dev_size)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        p, n = self.params, len(ctx.models)
        main = fitted_model(self, "main_model") if self._needs_main() else None
        agents = [main if p.agent_models == "dev_best" else m for m in ctx.models]
        base = ctx.task.prompt(example)
        question = user_text(base)
        board: list[Entry] = []
        acted: list[list[int]] = []
        for it in range(1, p.max_iterations + 1):
            acting = await self._control(ctx, main, question, board, n)
            acted.append(acting)
            # One seeded RNG per acting agent, drawn in order: retries make the number of
            # draws per agent vary, and concurrent agents must not share a stream.
            rngs = [random.Random(ctx.rng.randrange(2**63)) for _ in acting]
            done = await asyncio.gather(*(self._act(ctx, agents[a], a, question, base, board, r)
                                          for a, r in zip(acting, rngs)))
            for a, (text, _) in zip(acting, done):
                board.append({"id": len(board) + 1, "iteration": it, "agent": a, "text": text})
            if sum(stop for _, stop in done) >= p.min_agents_to_stop:
                break
        last = [e["text"] for e in board if e["iteration"] == len(acted) and e["text"] != INVALID]
        finals = [t.rsplit("FINAL:", 1)[1].strip() for t in last if "FINAL:" in t] or last
        if not finals:
            # No agent of the last iteration named an action: the placeholder is no answer, so
            # one model concludes from whatever the board holds (the decider's prompt).
            output = await self._conclude(ctx, main or agents[0], question, base, board)
            return Answer(output=output, meta={"board": board, "acting": acted,
                                               "conclusions": [], "votes": [],
                                               "concluded_by": main or agents[0]})
        output, votes = await self._decide(ctx, agents, main, question, base, board, finals)
        return Answer(output=output, meta={"board": board, "acting": acted,
                                           "conclusions": finals, "votes": votes})

    async def _control(self, ctx: ExampleContext, main: str | None, question: str,
                       board: list[Entry], n: int) -> list[int]:
        k = min(self.params.agents_per_iteration, n)
        if self.params.control == "random":
            return ctx.rng.sample(range(n), k)
        head = P.HEAD.format(problem=question, board=_board(board))
        prompt = plain(f"{head}\n\n{P.CONTROL.format(n=n, k=k)}")
        [g] = await ctx.generate(main, prompt, self.params.sampling(ctx.task, ctx.rng),
                                 step="control")
        picked: list[int] = []
        for num in re.findall(r"Agent\s*#?\s*(\d+)", g.text, flags=re.IGNORECASE):
            a = int(num) - 1
            if 0 <= a < n and a not in picked and len(picked) < k:
                picked.append(a)
        rest = [a for a in range(n) if a not in picked]  # an unclear pick is filled at random
        return picked + ctx.rng.sample(rest, k - len(picked))

    async def _act(self, ctx: ExampleContext, model: str, agent: int, question: str,
                   base: Prompt, board: list[Entry], rng: random.Random) -> tuple[str, bool]:
        """One agent's turn: choose an action, then carry it out. (entry text, terminate?)"""
        p = self.params
        head = (P.HEAD.format(problem=question, board=_board(board)) + "\n\n"
                + P.AGENT.format(agent=agent + 1))
        tries = p.max_retries if p.temperature > 0 else 1  # greedy retries would repeat
        for _ in range(tries):
            [sel] = await ctx.generate(model, plain(head + "\n\n" + P.SELECT),
                                       p.sampling(ctx.task, rng), step="select_action")
            action = _action(sel.text)
            if action is None:
                continue
            body = head + "\n\n" + P.EXECUTE[action].format(thinking=sel.text.strip())
            # The final solution keeps the task's prompt shape: its answer format applies.
            prompt = with_user_text(base, body) if action == P.TERMINATE else plain(body)
            [ex] = await ctx.generate(model, prompt, p.sampling(ctx.task, rng),
                                      step=f"action:{action}")
            return f"{sel.text.strip()}\n\n---\n\n{ex.text.strip()}", action == P.TERMINATE
        return INVALID, False

    async def _conclude(self, ctx: ExampleContext, model: str, question: str, base: Prompt,
                        board: list[Entry]) -> str:
        """`model` reads the board and answers, in the task's prompt shape (its format)."""
        head = P.HEAD.format(problem=question, board=_board(board))
        prompt = with_user_text(base, f"{head}\n\n{P.DECIDE}")
        [g] = await ctx.generate(model, prompt, self.params.sampling(ctx.task, ctx.rng),
                                 step="decide")
        return g.text

    async def _decide(self, ctx: ExampleContext, agents: list[str], main: str | None,
                      question: str, base: Prompt, board: list[Entry], finals: list[str]
                      ) -> tuple[str, list[int | None]]:
        if self.params.decider == "dev_best":
            return await self._conclude(ctx, main, question, base, board), []
        if len(finals) <= 1:
            return (finals[0] if finals else ""), []
        options = "\n".join(f"Conclusion #{i + 1}: {c}" for i, c in enumerate(finals))
        head = P.HEAD.format(problem=question, board=_board(board))
        prompt = plain(f"{head}\n\n{P.VOTE.format(options=options)}")
        params = [self.params.sampling(ctx.task, ctx.rng) for _ in agents]
        gens = await asyncio.gather(*(ctx.generate(m, prompt, sp, step="vote")
                                      for m, sp in zip(agents, params)))
        votes = [_vote(g.text, len(finals)) for [g] in gens]
        counts = Counter(v for v in votes if v is not None)  # an unparseable vote is no vote
        if not counts:
            return finals[0], votes
        top = max(counts.values())
        return finals[min(v for v, c in counts.items() if c == top) - 1], votes


def _board(board: list[Entry]) -> str:
    """The board as agents read it; a turn that named no action wrote nothing worth reading."""
    shown = [e for e in board if e["text"] != INVALID]
    if not shown:
        return "The blackboard is empty."
    return "\n\n".join(f"Entry #{e['id']} (iteration {e['iteration']}, Agent {e['agent'] + 1}):"
                       f"\n{e['text']}" for e in shown)


def _action(text: str) -> str | None:
    """The one action phrase the agent chose (any letter case); None if it names none or
    several."""
    low = text.lower()
    named = [a for a in P.EXECUTE if a in low]
    return named[0] if len(named) == 1 else None


def _vote(text: str, n: int) -> int | None:
    m = re.search(r"Conclusion\s*#\s*(\d+)", text, flags=re.IGNORECASE)
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= n else None
