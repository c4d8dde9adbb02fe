import asyncio

import pytest
import torch
from pydantic import ValidationError

from moco_ray.strategies.api.graph_routing import (
    GraphRouting,
    _macro_f1,
    best_models,
    text_features,
)


def topic(qid: str) -> str:
    return "alpha topic words" if int(qid[1:]) % 2 == 0 else "beta other terms"


def specialists(right):
    """Model m answers right exactly on the topics in right[m]; test answers name the model."""
    def respond(call):
        if call.qid.startswith("t"):
            return f"Answer: {call.model}"
        return "Answer: 7" if topic(call.qid).split()[0] in right[call.model] else "Answer: 0"
    return respond


# Fast settings for 8 dev questions; the defaults (lr 1e-4) are the reference's, for real dev sets.
FAST = {"learning_rate": 0.05, "train_epochs": 150, "split_ratio": [1.0, 0.0, 0.0]}


def route_all(toy, right, **params):
    ctx, pool = toy(["a", "b"], specialists(right), n_dev=8, n_test=4, topic=topic)
    strat = GraphRouting({**FAST, **params})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    assert {c.qid[0] for c in pool.calls} == {"d"}  # fit saw dev only
    out = {}
    for ex in ctx.task.test.examples:
        ans = asyncio.run(strat.solve(ctx.example(ex), ex))
        out[ex.id] = ans.meta["routed_to"]
        assert ans.output == f"Answer: {ans.meta['routed_to']}"
    return strat, out


def test_routes_each_question_to_the_topic_specialist(toy):
    strat, out = route_all(toy, {"a": {"alpha"}, "b": {"beta"}})
    assert out == {"t0": "a", "t1": "b", "t2": "a", "t3": "b"}
    assert strat.fitted["dev_accuracy"] == {"a": 0.5, "b": 0.5}
    assert strat.fitted["labels_per_model"] == {"a": 4.0, "b": 4.0}


def test_scenario_trades_performance_for_cost(toy):
    right = {"a": {"alpha", "beta"}, "b": {"beta"}}  # a always right, b only on beta
    costs = {"model_costs": [1.0, 0.1]}
    # performance first: b where it is as good (and cheaper), a elsewhere
    _, perf = route_all(toy, right, **costs)
    assert perf == {"t0": "a", "t1": "b", "t2": "a", "t3": "b"}
    # cost first (0.2 * effect - 0.8 * cost): the cheap model everywhere
    _, cheap = route_all(toy, right, scenario="Cost First", **costs)
    assert set(cheap.values()) == {"b"}


def test_validation_split_and_report(toy):
    ctx, _ = toy(["a", "b"], specialists({"a": {"alpha"}, "b": {"beta"}}), n_dev=10,
                 topic=topic)
    strat = GraphRouting({"learning_rate": 0.05, "train_epochs": 30,
                          "split_ratio": [0.6, 0.2, 0.2]})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    assert 0.0 <= strat.fitted["val_macro_f1"] <= 1.0
    assert strat.fitted["report_oracle_accuracy"] == 1.0
    assert 0.0 <= strat.fitted["report_routed_accuracy"] <= 1.0


def test_features_and_metric():
    a, b = text_features("alpha topic", 64), text_features("Alpha   topic!", 64)
    assert torch.equal(a, b) and float(a.norm()) == pytest.approx(1.0)
    assert not torch.equal(a, text_features("beta terms", 64))
    assert _macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])) == pytest.approx(
        (2 / 3 + 2 / 3) / 2)
    # labels: the best combined effect; ties to the cheaper model, then the earlier one
    combined = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.5, 0.5]])
    cost = torch.tensor([[0.5, 0.1, 0.0], [0.3, 0.3, 0.3], [0.0, 0.9, 0.2]])
    assert best_models(combined, cost) == [1, 0, 2]


def test_param_errors(toy):
    with pytest.raises(ValidationError, match="split_ratio"):
        GraphRouting({"split_ratio": [0.5, 0.2, 0.2]})
    with pytest.raises(ValidationError, match="scenario"):
        GraphRouting({"scenario": "Cheap"})
    ctx, _ = toy(["a", "b"], specialists({"a": set(), "b": set()}), topic=topic)
    with pytest.raises(ValueError, match="3 entries for 2 models"):
        asyncio.run(GraphRouting({"model_costs": [1, 2, 3]}).fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(GraphRouting().solve(ctx.example(ex), ex))
