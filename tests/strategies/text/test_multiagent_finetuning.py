"""Multiagent finetuning, logic only: scripted pool, `train_adapters` replaced by a recorder.

Script (3 agents a, b, c; every reference is "7"):
  round 1 (generation): a says 7, b says 7, c says 3
  round 2 (critic):     a says 7, b says 7 (5 on d0), c says 7 (a correction)
  on d3 the critics a and b say 9 instead: the consensus (9) is not the reference, and training
  must follow the consensus, never the reference.
"""
from __future__ import annotations

import asyncio
import contextvars
import re

import pytest
from pydantic import ValidationError

from moco_ray.strategies.registry import get_strategy
from moco_ray.strategies.text import multiagent_finetuning as maf

LORA = contextvars.ContextVar("lora", default=None)


def qid(call) -> str:
    return call.qid


def is_critic(call) -> bool:
    return "Your previous answer" in call.text


def script(call) -> str:
    q, m = qid(call), call.model
    if not is_critic(call):
        return {"a": "Answer: 7", "b": "Answer: 7", "c": "Answer: 3"}[m]
    if q == "d3" and m in ("a", "b"):
        return "Answer: 9"
    if q == "d0" and m == "b":
        return "Answer: 5"
    return "Answer: 7"


def with_lora_log(pool):
    """Record the adapter of every call: (model, question id, critic?, lora)."""
    log: list[tuple[str, str, bool, str | None]] = []
    orig_generate, respond = pool.generate, pool.respond

    async def generate(model, prompts, params, lora=None):
        token = LORA.set(lora)
        try:
            return await orig_generate(model, prompts, params, lora)
        finally:
            LORA.reset(token)

    def logged(call):
        log.append((call.model, qid(call), is_critic(call), LORA.get()))
        return respond(call)

    pool.generate, pool.respond = generate, logged
    return log


class FakeTrainer:
    """Stands in for train_adapters: keeps each call's jobs, returns one dir per adapter."""

    def __init__(self):
        self.calls: list[dict] = []

    async def __call__(self, ctx, jobs, cfg=None):
        self.calls.append({"jobs": jobs, "cfg": cfg})
        it = len(self.calls)
        return {name: f"/adapters/it{it}/{name}" for name in jobs}


@pytest.fixture
def trainer(monkeypatch):
    t = FakeTrainer()
    monkeypatch.setattr(maf, "train_adapters", t)
    return t


def strategy(**kw):
    return get_strategy("text_multiagent_finetuning")({"temperature": 0.0, **kw})


def assistant(row) -> str:
    return row["messages"][-1]["content"]


def row_qid(row) -> str:
    return re.search(r"Question (\w+)", prompt_text(row)).group(1)


def prompt_text(row) -> str:
    return "\n".join(m["content"] for m in row["messages"][:-1])


def test_consensus_is_the_majority_of_final_answers():
    import random

    rng = random.Random(0)
    assert maf.consensus(["7", "9", "9"], rng) == "9"
    assert maf.consensus(["", "", "4"], rng) == "4"  # unparseable answers do not vote
    assert maf.consensus(["", ""], rng) is None
    picks = {maf.consensus(["1", "2"], random.Random(s)) for s in range(20)}
    assert picks == {"1", "2"}  # a tie is broken by the seeded rng, not always the same way


def test_generation_and_critic_sets_follow_the_consensus(toy, trainer):
    ctx, _pool = toy(["a", "b", "c"], script, n_dev=4, n_test=2)
    s = strategy()
    asyncio.run(s.fit(ctx, ctx.task.dev))
    [call] = trainer.calls
    jobs = call["jobs"]
    # c's first answers (3) never agree with the consensus: no generation adapter for c.
    assert sorted(jobs) == ["critic0", "critic1", "critic2", "gen0", "gen1"]
    assert {k: m for k, (m, _) in jobs.items()} == {
        "gen0": "a", "gen1": "b", "critic0": "a", "critic1": "b", "critic2": "c"}

    gen_a = jobs["gen0"][1]
    # a's first answer (7) agrees with the consensus on d0, d1, d2; on d3 the consensus is 9.
    assert {row_qid(r) for r in gen_a} == {"d0", "d1", "d2"}
    assert len(gen_a) == 4  # cycled up to one optimizer step (batch 4)
    assert all(assistant(r) == "Answer: 7" for r in gen_a)
    assert all("Your previous answer" not in prompt_text(r) for r in gen_a)  # first-round prompt
    assert gen_a[0]["messages"][0]["role"] == "system"  # the task's own prompt, kept whole

    # Critics learn their own final responses to the critic prompt they saw. a: kept 7 on d0-d2
    # (DC+), changed 7 -> 9 = consensus on d3 (DC-); w = 0.5 repeats the lone DC- row 3 times.
    crit_a = jobs["critic0"][1]
    assert all("Your previous answer" in prompt_text(r) for r in crit_a)
    assert sorted((row_qid(r), assistant(r)) for r in crit_a) == [
        ("d0", "Answer: 7"), ("d1", "Answer: 7"), ("d2", "Answer: 7"),
        ("d3", "Answer: 9"), ("d3", "Answer: 9"), ("d3", "Answer: 9")]
    # b's final answer on d0 (5) disagrees with the consensus: left out
    crit_b = jobs["critic1"][1]
    assert {row_qid(r) for r in crit_b} == {"d1", "d2", "d3"}
    assert "Answer: 5" not in [assistant(r) for r in crit_b]
    # c corrected 3 -> 7 on d0, d1, d2 (DC-); on d3 its 7 is not the consensus (9)
    crit_c = jobs["critic2"][1]
    assert {row_qid(r) for r in crit_c} == {"d0", "d1", "d2"}
    assert all("Answer: 3" in prompt_text(r) for r in crit_c)  # its own wrong first answer

    log = s.fitted["iterations"][0]
    assert log["generation_rows"] == [3, 3, 0]
    assert log["critic_minus_rows"] == [1, 1, 3]  # a, b: 7 -> 9 on d3; c: 3 -> 7 on d0-d2
    assert log["critic_plus_rows"] == [3, 2, 0]
    assert log["critic_rows"] == [6, 4, 3]
    assert log["consensus_dev_accuracy"] == 0.75  # d3's consensus (9) is wrong
    assert s.fitted["generation_adapters"] == ["/adapters/it1/gen0", "/adapters/it1/gen1", None]


def test_fit_uses_dev_only(toy, trainer):
    ctx, pool = toy(["a", "b", "c"], script, n_dev=4, n_test=3)
    asyncio.run(strategy().fit(ctx, ctx.task.dev))
    assert pool.calls and all(qid(c).startswith("d") for c in pool.calls)
    for _, rows in trainer.calls[0]["jobs"].values():
        assert rows and all(row_qid(r).startswith("d") for r in rows)
    with pytest.raises(TypeError, match="dev data only"):
        asyncio.run(strategy().fit_checked(ctx, ctx.task.test))


def test_adapters_are_used_in_the_right_rounds_and_majority_answers(toy, trainer):
    ctx, pool = toy(["a", "b", "c"], script, n_dev=4, n_test=2)
    log = with_lora_log(pool)
    s = strategy()
    asyncio.run(s.fit(ctx, ctx.task.dev))
    # During the first iteration's debate nothing is trained yet: the models as served.
    assert {lora for *_, lora in log} == {None}
    log.clear()
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(s.solve(ctx.example(ex), ex))
    got = {(m, critic): lora for m, _, critic, lora in log}
    assert len(log) == 6  # 3 agents x 2 rounds
    assert got == {("a", False): "/adapters/it1/gen0", ("b", False): "/adapters/it1/gen1",
                   ("c", False): None,  # no generation data: c generates as served
                   ("a", True): "/adapters/it1/critic0", ("b", True): "/adapters/it1/critic1",
                   ("c", True): "/adapters/it1/critic2"}
    assert ans.meta["winner"] == "7" and ans.output == "Answer: 7"
    assert len(ans.meta["rounds"]) == 2


def test_final_answer_is_the_majority_of_the_final_round(toy, trainer):
    def respond(call):
        if not is_critic(call):
            return "Answer: 1"  # round 1 is unanimous ...
        return {"a": "Answer: 4", "b": "Answer: 4", "c": "Answer: 1"}[call.model]  # ... final not

    ctx, _pool = toy(["a", "b", "c"], respond, n_dev=2, n_test=1)
    s = strategy()
    asyncio.run(s.fit(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(s.solve(ctx.example(ex), ex))
    assert ans.meta["winner"] == "4" and ans.output == "Answer: 4"
    assert ans.meta["votes"] == {"4": 2, "1": 1}


def test_one_model_gives_three_agents_with_their_own_adapters(toy, trainer):
    counter = {"n": 0}

    def respond(call):
        counter["n"] += 1
        return "Answer: 7"

    ctx, pool = toy(["a"], respond, n_dev=2, n_test=1)
    s = strategy(temperature=0.7)
    asyncio.run(s.fit(ctx, ctx.task.dev))
    assert s.fitted["agents"] == ["a", "a", "a"]  # the paper's 3 copies
    assert counter["n"] == 2 * 3 * 2  # 2 dev examples x 3 agents x 2 rounds
    jobs = trainer.calls[0]["jobs"]
    assert sorted(jobs) == ["critic0", "critic1", "critic2", "gen0", "gen1", "gen2"]
    assert all(m == "a" for m, _ in jobs.values())
    seeds = [c.params.seed for c in pool.calls if qid(c) == "d0" and not is_critic(c)]
    assert len(set(seeds)) == 3  # copies sample independently


def test_later_iterations_debate_with_the_previous_adapters(toy, trainer):
    ctx, pool = toy(["a", "b", "c"], script, n_dev=4, n_test=1)
    log = with_lora_log(pool)
    s = strategy(iterations=2)
    asyncio.run(s.fit(ctx, ctx.task.dev))
    assert len(trainer.calls) == 2
    second = log[len(log) // 2:]
    assert {lora for m, _, critic, lora in second if m == "a" and not critic} == {
        "/adapters/it1/gen0"}
    assert {lora for m, _, critic, lora in second if m == "c" and critic} == {
        "/adapters/it1/critic2"}
    assert s.fitted["critic_adapters"][2] == "/adapters/it2/critic2"


def test_critic_mix_follows_w():
    minus = [{"id": f"m{i}"} for i in range(1)]
    plus = [{"id": f"p{i}"} for i in range(3)]
    half = maf.mix_critic(minus, plus, 0.5)
    assert sum(r["id"].startswith("m") for r in half) == 3  # the lone correction, 3 times
    assert sum(r["id"].startswith("p") for r in half) == 3  # every kept answer once
    quarter = maf.mix_critic(minus, plus, 0.25)
    assert [r["id"] for r in quarter] == ["m0", "p0", "p1", "p2"]
    assert maf.fill(minus, 4) == minus * 4 and maf.fill(plus * 2, 4) == plus * 2
    assert maf.mix_critic(minus, plus, 0.0) == plus
    assert maf.mix_critic(minus, plus, 1.0) == minus
    assert maf.mix_critic([], plus, 0.5) == plus
    many = maf.mix_critic([{"id": f"m{i}"} for i in range(6)], plus, 0.5)
    assert len(many) == 12 and {r["id"] for r in many} >= {f"m{i}" for i in range(6)}


def test_no_critic_rounds_means_no_critic_adapters(toy, trainer):
    ctx, _ = toy(["a", "b", "c"], script, n_dev=3, n_test=1)
    s = strategy(rounds=1)
    asyncio.run(s.fit(ctx, ctx.task.dev))
    assert sorted(trainer.calls[0]["jobs"]) == ["gen0", "gen1"]


def test_bad_params_and_missing_fit(toy, trainer):
    cls = get_strategy("text_multiagent_finetuning")
    for bad in ({"w": 1.5}, {"rounds": 0}, {"agents": 0}, {"train_steps": 0}, {"nope": 1}):
        with pytest.raises(ValidationError):
            cls(bad)
    ctx, _ = toy(["a", "b", "c"], script, n_dev=2, n_test=1)
    with pytest.raises(ValueError, match="params.agents=2"):
        asyncio.run(strategy(agents=2).fit(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(strategy().solve(ctx.example(ex), ex))
    s = strategy(train_steps=7, train_lr=5e-4)
    asyncio.run(s.fit(ctx, ctx.task.dev))
    cfg = trainer.calls[-1]["cfg"]
    assert cfg.max_steps == 7 and cfg.lr == 5e-4 and cfg.output == "adapter"
