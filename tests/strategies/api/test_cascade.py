import asyncio
import math

import pytest

from moco_ray.strategies.api.cascade import Cascade

# Dev and test behaviour per model: (confidence, answer) by example id.
DEV = {
    "weak": {"d0": (-0.1, "7"), "d1": (-0.2, "7"), "d2": (-0.3, "7"), "d3": (-0.4, "0"),
             "d4": (-1.0, "0"), "d5": (-2.0, "0")},
    "mid": {"d0": (-1.0, "0"), "d1": (-2.0, "7"), "d2": (-3.0, "7"), "d3": (-4.0, "7"),
            "d4": (-5.0, "7"), "d5": (-6.0, "0")},
    "strong": {f"d{i}": (-9.0, "7") for i in range(6)},
}
TEST = {"weak": {"t0": -0.05, "t1": -0.9, "t2": -0.9},
        "mid": {"t0": -9.0, "t1": -1.0, "t2": -9.0},
        "strong": {"t0": -50.0, "t1": -50.0, "t2": -50.0}}


def respond(call):
    if call.qid.startswith("d"):
        conf, ans = DEV[call.model][call.qid]
    else:
        conf, ans = TEST[call.model][call.qid], call.model
    return f"Answer: {ans}", conf


def fitted(toy, models, **params):
    ctx, pool = toy(models, respond, n_dev=6, n_test=3)
    strat = Cascade(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    return strat, ctx, pool


def test_each_model_gets_the_quantile_of_its_own_dev_confidences(toy):
    strat, _, pool = fitted(toy, ["weak", "mid", "strong"])
    # reference default percentage 0.5: the median of each model's own confidences
    assert strat.fitted["thresholds"] == {"weak": pytest.approx(-0.35),
                                          "mid": pytest.approx(-3.5)}
    assert all(c.params.logprobs == 1 and c.params.temperature == 0.7 for c in pool.calls)
    assert {c.qid for c in pool.calls} == {f"d{i}" for i in range(6)}


def test_max_accuracy_rule_maximises_the_cascades_dev_accuracy(toy):
    strat, _, _ = fitted(toy, ["weak", "strong"], threshold_rule="max_accuracy")
    # accepting weak's 3 most confident answers (all right) and deferring the rest to strong
    # (always right) is perfect; -0.3 is the lowest threshold that keeps it perfect
    assert strat.fitted["thresholds"] == {"weak": -0.3}
    assert strat.fitted["dev_cascade_accuracy"] == 1.0
    strat3, _, _ = fitted(toy, ["weak", "mid", "strong"], threshold_rule="max_accuracy")
    t = strat3.fitted["thresholds"]
    # strong is always right on dev and mid is not, so mid learns to defer everything
    assert t["weak"] == -0.3 and t["mid"] == math.inf
    assert strat3.fitted["dev_cascade_accuracy"] == 1.0


def test_defers_by_each_models_threshold_and_the_last_always_answers(toy):
    strat, ctx, pool = fitted(toy, ["weak", "mid", "strong"])
    pool.calls.clear()
    out = {}
    for ex in ctx.task.test.examples:
        ans = asyncio.run(strat.solve(ctx.example(ex), ex))
        out[ex.id] = (ans.meta["answered_by"], ans.output)
    assert out == {"t0": ("weak", "Answer: weak"),      # -0.05 >= -0.35: accepted
                   "t1": ("mid", "Answer: mid"),        # weak defers; -1.0 >= -3.5
                   "t2": ("strong", "Answer: strong")}  # both defer; strong answers at -50
    assert [c.model for c in pool.calls if c.qid == "t0"] == ["weak"]
    assert [c.model for c in pool.calls if c.qid == "t2"] == ["weak", "mid", "strong"]


def test_order_by_dev_accuracy_puts_the_weak_model_first(toy):
    strat, _, _ = fitted(toy, ["strong", "weak"], order="dev_accuracy")
    assert strat.fitted["order"] == ["weak", "strong"]
    assert set(strat.fitted["thresholds"]) == {"weak"}


def test_missing_logprobs_and_missing_fit_raise(toy):
    ctx, _ = toy(["a", "b"], lambda c: "Answer: 7")  # the engine reports no logprobs
    with pytest.raises(RuntimeError, match="no logprobs"):
        asyncio.run(Cascade().fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(Cascade().solve(ctx.example(ex), ex))


def test_empty_answer_has_no_confidence_and_defers(toy):
    def r(call):
        return ("", 0.0) if call.model == "a" else ("Answer: 7", -1.0)

    ctx, _ = toy(["a", "b"], r)
    strat = Cascade()
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    assert strat.fitted["thresholds"]["a"] == -math.inf
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(strat.solve(ctx.example(ex), ex))
    assert ans.meta["confidences"]["a"] == -math.inf
    assert ans.meta["answered_by"] == "b"  # even a threshold of -inf never accepts nothing
