import asyncio
import re
from collections import Counter

import pytest
from pydantic import ValidationError

from moco_ray.strategies.text.structure import Structure

FIVE = ["a", "b", "c", "d", "e"]
# Who reads whom in round 1, for five models (index order a..e).
EXPECTED = {
    "chain": {"a": "b", "b": "ac", "c": "bd", "d": "ce", "e": "d"},
    "tree": {"a": "bc", "b": "ade", "c": "a", "d": "b", "e": "b"},
    "star": {"a": "bcde", "b": "a", "c": "a", "d": "a", "e": "a"},
    "wheel": {"a": "bcde", "b": "ace", "c": "abd", "d": "ace", "e": "abd"},
    "circle": {"a": "be", "b": "ac", "c": "bd", "d": "ce", "e": "ad"},
    "complete": {m: "".join(o for o in FIVE if o != m) for m in FIVE},
}


def structure_pool(toy, models, good=None, **kw):
    """Each answer names its model and round ('c-r1'); on dev only `good` is right."""
    rounds: Counter = Counter()

    def respond(call):
        if call.qid.startswith("d"):
            return f"Answer: {'7' if call.model == good else '0'}"
        key = (call.model, call.qid)
        rounds[key] += 1
        return f"{call.model}-r{rounds[key] - 1} Answer: 5"

    return toy(models, respond, **kw)


def run(toy, models, params, good=None):
    ctx, pool = structure_pool(toy, models, good=good or models[-1])
    strat = Structure(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    pool.calls.clear()
    return asyncio.run(strat.solve(ctx.example(ex), ex)), pool, strat


def seen(call):
    """(own previous answer, the neighbours' answers) shown in an update prompt."""
    own = re.search(r"Your previous answer:\n(\w+-r\d+)", call.text).group(1)
    others = call.text.split("Answers from other assistants:")[1]
    return own, sorted(re.findall(r"\[\d+\] (\w+-r\d+)", others))


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_topology_shows_each_model_exactly_its_neighbours(toy, kind):
    _, pool, _ = run(toy, FIVE, {"structure": kind, "rounds": 2})
    for m in FIVE:
        first, update = pool.of(m)
        assert "Your previous answer" not in first.text  # round 0 answers alone
        assert seen(update) == (f"{m}-r0", [f"{o}-r0" for o in EXPECTED[kind][m]])
        assert update.prompt[0]["role"] == "system"


def test_rounds_are_synchronous_and_a_model_nobody_sends_to_keeps_its_answer(toy):
    # directed custom graph: a -> b -> c (row = sender)
    adj = [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    ans, pool, strat = run(toy, ["a", "b", "c"], {"structure": "custom", "adjacency": adj},
                           good="a")
    assert len(pool.of("a")) == 1  # no in-edges: answers once, never revises
    assert [seen(c) for c in pool.of("b")[1:]] == [("b-r0", ["a-r0"]), ("b-r1", ["a-r0"])]
    # round 2: c reads b's round-1 answer, not the one b writes in the same round
    assert [seen(c) for c in pool.of("c")[1:]] == [("c-r0", ["b-r0"]), ("c-r1", ["b-r1"])]
    assert [r["a"] for r in ans.meta["rounds"]] == ["a-r0 Answer: 5"] * 3
    # the final answer is the dev-best model's last answer (reference)
    assert strat.fitted["final_model"] == "a" and ans.output == "a-r0 Answer: 5"
    ans, _, _ = run(toy, ["a", "b", "c"], {"structure": "custom", "adjacency": adj}, good="c")
    assert ans.output == "c-r2 Answer: 5"


def test_reference_defaults_three_rounds_star(toy):
    ans, pool, _ = run(toy, ["a", "b", "c", "d"], {})
    assert len(ans.meta["rounds"]) == 3 and len(pool.of("b")) == 3
    assert seen(pool.of("b")[2]) == ("b-r1", ["a-r1"])  # star: a spoke reads only the hub


def test_bad_adjacency_is_refused_with_the_reason(toy):
    with pytest.raises(ValidationError, match="only 0 and 1"):
        Structure({"structure": "custom", "adjacency": [[0, 2], [1, 0]]})
    with pytest.raises(ValidationError, match="self-loops"):
        Structure({"structure": "custom", "adjacency": [[1, 1], [1, 0]]})
    with pytest.raises(ValueError, match="must be 3 x 3"):
        run(toy, ["a", "b", "c"], {"structure": "custom", "adjacency": [[0, 1], [1, 0]]})
    with pytest.raises(ValueError, match="needs params.adjacency"):
        run(toy, ["a", "b"], {"structure": "custom"})
    with pytest.raises(ValueError, match="set structure='custom'"):
        run(toy, ["a", "b"], {"structure": "chain", "adjacency": [[0, 1], [1, 0]]})
