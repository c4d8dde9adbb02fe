import asyncio

import pytest

from moco_ray.strategies.api.prompt_routing import PromptRouting, parse_choice

TOPICS = {"d0": "alpha", "d1": "beta", "d2": "gamma", "d3": "alpha",
          "t0": "gamma", "t1": "alpha", "t2": "beta"}
# dev: which models answer which dev question right (b is best: 3 of 4)
RIGHT = {"a": {"d0", "d3"}, "b": {"d0", "d1", "d3"}, "c": {"d2"}}


def respond(call):
    if "routes user questions" in call.text:  # the router's turn
        question = call.text.split("User question: ")[1].split("\n")[0]
        if "gamma" in question:
            return "Model 3."
        if "alpha" in question:
            return "1"
        return "I cannot tell; maybe model 7"  # no valid number: fall back to the best
    if call.qid.startswith("d"):
        return "Answer: 7" if call.qid in RIGHT[call.model] else "Answer: 0"
    return f"Answer: {call.model}"


def fitted(toy, **params):
    ctx, pool = toy(["a", "b", "c"], respond, n_dev=4, n_test=3, topic=TOPICS.get)
    strat = PromptRouting(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    return strat, ctx, pool


def test_best_dev_model_routes_each_question_to_the_model_it_names(toy):
    strat, ctx, pool = fitted(toy)
    assert strat.fitted["router"] == "b"
    assert strat.fitted["dev_accuracy"] == {"a": 0.5, "b": 0.75, "c": 0.25}
    pool.calls.clear()
    routed = {}
    for ex in ctx.task.test.examples:
        ans = asyncio.run(strat.solve(ctx.example(ex), ex))
        routed[ex.id] = (ans.meta["routed_to"], ans.output, ans.meta["fallback"])
    assert routed == {"t0": ("c", "Answer: c", False), "t1": ("a", "Answer: a", False),
                      "t2": ("b", "Answer: b", True)}
    router_calls = [c for c in pool.calls if "routes user questions" in c.text]
    assert {c.model for c in router_calls} == {"b"}
    # answers get the task's own (chat) prompt; the router a raw instruction
    answers = [c for c in pool.calls if c not in router_calls]
    assert all(isinstance(c.prompt, list) for c in answers)
    assert [c.model for c in answers] == ["c", "a", "b"]


def test_descriptions_come_from_dev_accuracy_and_strengths(toy):
    strat, _, _ = fitted(toy)
    a, b, c = strat.fitted["descriptions"]
    assert "answered 50% of 4 questions" in a and '"Question d0 alpha"' in a
    assert "answered 25% of 4" in c and '"Question d2 gamma"' in c
    # a question every model got right or wrong is no strength; at most 2 are quoted
    assert b.count('"Question') == 2


def test_given_descriptions_and_router(toy):
    strat, ctx, pool = fitted(toy, model_descriptions=["alpha expert", "generalist", "gamma"],
                              router="c")
    ex = ctx.task.test.examples[0]
    pool.calls.clear()
    asyncio.run(strat.solve(ctx.example(ex), ex))
    [route] = [c for c in pool.calls if "routes user questions" in c.text]
    assert route.model == "c"
    assert "- 1: alpha expert\n- 2: generalist\n- 3: gamma\n" in route.text
    assert "User question: Question t0 gamma\n" in route.text


def test_parse_choice_and_errors(toy):
    assert parse_choice("I pick 2", 3) == 1
    assert parse_choice("10, no: 3", 3) == 2  # first number in range; 10 is no model
    assert parse_choice("none", 3) is None and parse_choice("0", 3) is None
    ctx, _ = toy(["a", "b"], respond, topic=TOPICS.get)
    with pytest.raises(ValueError, match="3 entries for 2 models"):
        asyncio.run(PromptRouting({"model_descriptions": ["x", "y", "z"]})
                    .fit_checked(ctx, ctx.task.dev))
    with pytest.raises(ValueError, match="not among"):
        asyncio.run(PromptRouting({"router": "zzz"}).fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(PromptRouting().solve(ctx.example(ex), ex))
