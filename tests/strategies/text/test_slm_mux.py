import asyncio
from collections import Counter

import pytest
from pydantic import ValidationError

from moco_ray.strategies.text.slm_mux import SLMMux

# Five samples per model on the test question: a is steady but outvoted, b and c agree with
# each other on "5" overall; a plain majority vote over all samples would say 5.
TEST = {"a": ["2"] * 5, "b": ["5", "5", "5", "5", "9"], "c": ["5", "5", "5", "9", "9"]}


def mux_pool(toy, test, dev_good=("a",), **kw):
    seen: Counter = Counter()

    def respond(call):
        if call.qid.startswith("d"):
            return f"Answer: {'7' if call.model in dev_good else '0'}"
        i = seen[call.model, call.qid]
        seen[call.model, call.qid] += 1
        return f"{call.model} sample {i}. Answer: {test[call.model][i]}"

    return toy(list(test), respond, **kw)


def solve(toy, test, params=None, **kw):
    ctx, pool = mux_pool(toy, test, **kw)
    strat = SLMMux(params or {})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    pool.calls.clear()
    return asyncio.run(strat.solve(ctx.example(ex), ex)), pool, strat


def test_the_most_self_consistent_model_wins_not_the_most_frequent_answer(toy):
    ans, pool, _ = solve(toy, TEST)
    overall = Counter(a for v in TEST.values() for a in v)
    assert overall.most_common(1)[0][0] == "5"
    assert ans.meta["winner"] == "a" and ans.meta["answer"] == "2"
    assert ans.meta["confidence"] == {"a": 1.0, "b": 0.8, "c": 0.6}
    assert ans.meta["answers"] == {"a": "2", "b": "5", "c": "5"}
    assert ans.output == "a sample 0. Answer: 2" and not ans.meta["tie"]
    # reference default: 5 samples per model, each its own call with its own seed
    assert Counter(c.model for c in pool.calls) == {"a": 5, "b": 5, "c": 5}
    assert len({c.params.seed for c in pool.calls}) == 15
    assert {c.params.temperature for c in pool.calls} == {0.7}


def test_output_is_a_sample_that_gives_the_winning_answer(toy):
    test = {"a": ["1", "3", "3", "3", "4"], "b": ["6", "7", "8", "9", "6"]}
    ans, _, _ = solve(toy, test, {"tie_break": "model_order"})
    assert ans.meta["winner"] == "a" and ans.output == "a sample 1. Answer: 3"


def test_unparseable_samples_lower_confidence(toy):
    # a: 3 of 5 samples say 4, the rest give no answer -> 0.6 (not 3/3); b: 4 of 5 say 6
    test = {"a": ["4", "4", "4", "", ""], "b": ["6", "6", "6", "6", "1"]}
    ans, _, _ = solve(toy, test, {"tie_break": "model_order"})
    assert ans.meta["confidence"] == {"a": 0.6, "b": 0.8} and ans.meta["winner"] == "b"


@pytest.mark.parametrize("good, winner", [(("b",), "b"), (("a", "b"), "a"), (("c",), "c")])
def test_ties_go_to_the_best_model_on_dev(toy, good, winner):
    test = {"a": ["1"] * 3, "b": ["2"] * 3, "c": ["3", "3", "4"]}
    if winner == "c":
        test["c"] = ["3"] * 3
    ans, _, strat = solve(toy, test, {"samples_per_model": 3}, dev_good=good)
    assert ans.meta["tie"] and ans.meta["winner"] == winner
    assert strat.fitted["dev_accuracy"][winner] == 1.0


def test_other_tie_rules_and_errors(toy):
    test = {"a": ["1"] * 2, "b": ["2"] * 2}
    ans, _, strat = solve(toy, test, {"samples_per_model": 2, "tie_break": "model_order"},
                          dev_good=("b",))
    assert ans.meta["winner"] == "a" and "dev_accuracy" not in strat.fitted
    winners = set()
    for seed in range(8):
        ans, _, _ = solve(toy, test, {"samples_per_model": 2, "tie_break": "random"}, seed=seed)
        winners.add(ans.meta["winner"])
    assert winners == {"a", "b"}
    with pytest.raises(ValidationError, match="identical samples"):
        SLMMux({"temperature": 0.0})
    ctx, _ = mux_pool(toy, test)
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(SLMMux({"samples_per_model": 2}).solve(ctx.example(ex), ex))
