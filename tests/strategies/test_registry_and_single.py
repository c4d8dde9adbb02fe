import asyncio

import pytest

from moco_ray.strategies.registry import get_strategy, list_strategies
from moco_ray.strategies.single import Single

BUILTIN = {"single": "single", "text_majority_vote": "text", "text_multiagent_refine": "text",
           "api_cascade": "api", "logit_logit_fusion": "logit"}


def test_builtins_are_registered_with_their_level():
    found = list_strategies()
    for name, level in BUILTIN.items():
        assert found[name].level == level and found[name].name == name
    assert get_strategy("moco_ray.strategies.single:Single") is Single
    with pytest.raises(KeyError, match="valid: .*api_cascade"):
        get_strategy("no_such_method")


def test_defaults_are_the_references():
    mv = get_strategy("text_majority_vote")().params
    assert (mv.tie_break, mv.samples_per_model, mv.temperature, mv.top_p) == \
        ("random", 1, 0.7, 0.9)
    assert get_strategy("text_multiagent_refine")().params.rounds == 3
    cas = get_strategy("api_cascade")().params
    assert (cas.threshold_rule, cas.percentage) == ("quantile", 0.5)
    assert get_strategy("logit_logit_fusion")().params.mode == "average"


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_fit_refuses_test_data(toy, name):
    ctx, pool = toy(["a", "b"], lambda c: ("Answer: 7", -0.5), group="g")
    strat = get_strategy(name)()
    with pytest.raises(TypeError, match="dev data only"):
        asyncio.run(strat.fit_checked(ctx, ctx.task.test))
    assert pool.calls == []


def test_single_is_greedy_on_the_first_model_by_default(toy):
    ctx, pool = toy(["a", "b"], lambda c: f"Answer: {c.model}")
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(Single().solve(ctx.example(ex), ex))
    assert ans.output == "Answer: a"
    [call] = pool.calls
    assert call.params.temperature == 0.0 and call.params.seed is None
    assert call.params.max_tokens == 32  # the task's
    ans = asyncio.run(Single({"model": "b", "max_tokens": 5}).solve(ctx.example(ex), ex))
    assert ans.output == "Answer: b" and pool.calls[-1].params.max_tokens == 5
    with pytest.raises(ValueError, match="not among this job's models"):
        asyncio.run(Single({"model": "zz"}).fit_checked(ctx, ctx.task.dev))
