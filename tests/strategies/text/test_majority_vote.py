import asyncio

import pytest
from pydantic import ValidationError

from moco_ray.strategies.text.majority_vote import MajorityVote


def solve(strategy, ctx, i=0):
    ex = ctx.task.test.examples[i]
    return asyncio.run(strategy.solve(ctx.example(ex), ex))


def test_majority_wins_and_output_is_a_full_winning_response(toy):
    script = {"a": "Let me think. Answer: 4", "b": "Answer: 5", "c": "It is four. Answer: 4 ok"}
    ctx, pool = toy(["a", "b", "c"], lambda c: script[c.model])
    ans = solve(MajorityVote(), ctx)
    assert ans.output == script["a"]
    assert ans.meta["votes"] == {"4": 2, "5": 1} and ans.meta["winner"] == "4"
    assert not ans.meta["tie"]
    # reference defaults reach the engine: temperature 0.7, top_p 0.9, the task's max_tokens
    assert {(c.params.temperature, c.params.top_p, c.params.max_tokens) for c in pool.calls} == \
        {(0.7, 0.9, 32)}


def test_unparseable_answers_do_not_vote(toy):
    script = {"a": "no idea", "b": "not sure", "c": "Answer: 9"}
    ctx, _ = toy(["a", "b", "c"], lambda c: script[c.model])
    ans = solve(MajorityVote(), ctx)
    assert ans.meta["winner"] == "9" and ans.output == "Answer: 9"


def test_random_tie_break_is_seeded_and_not_positional(toy):
    script = {"a": "Answer: 1", "b": "Answer: 2"}

    def winners(seed):
        ctx, _ = toy(["a", "b"], lambda c: script[c.model], n_test=20, seed=seed)
        return [solve(MajorityVote(), ctx, i).meta["winner"] for i in range(20)]

    first = winners(0)
    assert first == winners(0)  # same seed, same choices
    assert set(first) == {"1", "2"}  # not always the first voter
    assert first != winners(1)


def test_dev_best_tie_break_uses_dev_accuracy_measured_in_fit(toy):
    def respond(good):
        # `good` is right on dev; on test the two models tie with different answers
        def r(c):
            if c.qid.startswith("d"):
                return "Answer: 7" if c.model == good else "Answer: 0"
            return {"a": "Answer: 1", "b": "Answer: 2"}[c.model]
        return r

    for good, expected in [("b", "2"), ("a", "1")]:
        ctx, _pool = toy(["a", "b"], respond(good))
        mv = MajorityVote({"tie_break": "dev_best"})
        asyncio.run(mv.fit_checked(ctx, ctx.task.dev))
        assert mv.fitted["dev_accuracy"] == {good: 1.0, ({"a", "b"} - {good}).pop(): 0.0}
        ans = solve(mv, ctx)
        assert ans.meta["tie"] and ans.meta["winner"] == expected
        assert ans.meta["tie_voter"] == good and ans.output == f"Answer: {expected}"

    with pytest.raises(RuntimeError, match="needs fit"):
        solve(MajorityVote({"tie_break": "dev_best"}), toy(["a", "b"], respond("a"))[0])


def test_several_samples_per_model_get_distinct_seeds(toy):
    ctx, pool = toy(["a", "b"], lambda c: f"Answer: {c.params.seed % 2}")
    ans = solve(MajorityVote({"samples_per_model": 3, "temperature": 0.9}), ctx)
    assert len(pool.of("a")) == len(pool.of("b")) == 3
    seeds = [c.params.seed for c in pool.calls]
    assert len(set(seeds)) == 6 and all(c.params.temperature == 0.9 for c in pool.calls)
    assert sum(ans.meta["votes"].values()) == 6
    with pytest.raises(ValidationError, match="identical samples"):
        MajorityVote({"samples_per_model": 3, "temperature": 0.0})


def test_run_example_records_trace_and_cost_per_model(toy):
    script = {"a": "Answer: 7", "b": "Answer: 7", "c": "Answer: 3"}
    ctx, _ = toy(["a", "b", "c"], lambda c: script[c.model])
    ex = ctx.task.test.examples[0]
    rec = asyncio.run(MajorityVote().run_example(ctx, ex, "test"))
    assert rec.score == 1.0 and rec.output == "Answer: 7"
    assert [t.model for t in rec.trace] == ["a", "b", "c"]
    assert all(rec.cost[m].calls == 1 for m in "abc")
