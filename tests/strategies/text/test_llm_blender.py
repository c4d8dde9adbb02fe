import asyncio
import re

import pytest

from moco_ray.strategies.text.llm_blender import LLMBlender, _verdict

MODELS = ["a", "b", "c", "d"]
QUALITY = {"a": 1, "b": 4, "c": 3, "d": 0}  # what a good ranker should recover


def pair(text):
    return (re.search(r"Candidate A:\ncand-(\w)", text).group(1),
            re.search(r"Candidate B:\ncand-(\w)", text).group(1))


def respond_with(judge):
    def respond(call):
        if "Which answer is better" in call.text:
            return judge(*pair(call.text))
        if "combine several candidate answers" in call.text:
            return f"fused by {call.model} Answer: 7"
        return f"cand-{call.model} Answer: {QUALITY[call.model]}"
    return respond


def fair(x, y):
    return "A" if QUALITY[x] > QUALITY[y] else "B"


def solve(toy, params, judge=fair, **kw):
    ctx, pool = toy(MODELS, respond_with(judge), **kw)
    strat = LLMBlender(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    return asyncio.run(strat.solve(ctx.example(ex), ex)), pool


def fused(pool):
    [c] = [c for c in pool.calls if "combine several candidate answers" in c.text]
    return c, re.findall(r"Candidate \d+:\ncand-(\w)", c.text)


def test_pairwise_ranking_then_fusion_of_the_top_k(toy):
    ans, pool = solve(toy, {})
    judged = [c for c in pool.calls if "Which answer is better" in c.text]
    # every pair judged exactly once, by the ranker (default: the job's first model)
    assert sorted(pair(c.text) for c in judged) == [
        (x, y) for i, x in enumerate(MODELS) for y in MODELS[i + 1:]]
    assert {c.model for c in judged} == {"a"}
    assert {c.params.max_tokens for c in judged} == {128}  # reference ranker length
    assert ans.meta["wins"] == {"b": 3.0, "c": 2.0, "a": 1.0, "d": 0.0}
    assert ans.meta["ranking"] == ["b", "c", "a", "d"]
    call, order = fused(pool)
    assert order == ["b", "c", "a"]  # reference top_k 3, best first; d left out
    assert call.model == "a" and call.prompt[0]["role"] == "system"
    assert ans.output == "fused by a Answer: 7"
    assert {c.params.max_tokens for c in pool.calls if c not in judged} == {32}  # task's


def test_ranker_and_fuser_may_be_any_pool_model(toy):
    ans, pool = solve(toy, {"top_k": 2, "ranker": "judge", "fuser": "c"},
                      pool_models=MODELS + ["judge"])
    assert {c.model for c in pool.calls if "Which answer" in c.text} == {"judge"}
    assert "judge" not in ans.meta["candidates"]  # the ranker is not a candidate
    call, order = fused(pool)
    assert call.model == "c" and order == ["b", "c"]
    with pytest.raises(ValueError, match="ranker='nope'"):
        solve(toy, {"ranker": "nope"})


def test_likelihood_ranking_scores_A_against_B(toy):
    def scorer(model, text, cont):
        x, y = pair(text)
        return float(QUALITY[x] if cont == "A" else QUALITY[y])

    ans, pool = solve(toy, {"ranking": "likelihood", "top_k": 2}, scorer=scorer)
    assert not [c for c in pool.calls if "Which answer" in c.text]  # no verdicts generated
    assert len(pool.scored) == 6 and {tuple(c) for _, _, c in pool.scored} == {("A", "B")}
    assert ans.meta["ranking"] == ["b", "c", "a", "d"] and fused(pool)[1] == ["b", "c"]


def test_unclear_verdicts_split_the_point_and_ties_keep_job_order(toy):
    ans, pool = solve(toy, {"top_k": 2}, judge=lambda x, y: "hard to say")
    assert ans.meta["wins"] == {m: 1.5 for m in MODELS}
    assert fused(pool)[1] == ["a", "b"]


def test_both_orders_cancel_a_position_biased_judge(toy):
    always_a = lambda x, y: "A"
    ans, _ = solve(toy, {}, judge=always_a)
    assert ans.meta["ranking"] == ["a", "b", "c", "d"]  # bias alone decides: a is always first
    ans, pool = solve(toy, {"both_orders": True}, judge=always_a)
    assert ans.meta["wins"] == {m: 3.0 for m in MODELS}
    ans, pool = solve(toy, {"both_orders": True})
    assert len([c for c in pool.calls if "Which answer" in c.text]) == 12
    assert ans.meta["ranking"] == ["b", "c", "a", "d"]


def test_verdict_parsing():
    assert _verdict("A") == "A" and _verdict(" B.") == "B"
    assert _verdict("Answer A is better than B") == "A"
    assert _verdict("BECAUSE it is") == "" and _verdict("a or b") == ""
