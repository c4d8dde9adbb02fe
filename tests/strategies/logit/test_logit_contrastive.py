import asyncio

import pytest
import torch

from moco_ray.engines.lockstep import get_combine
from moco_ray.strategies.logit.logit_contrastive import LogitContrastive, contrast_weights

# dev questions each model answers right: b is best, c middle, a worst
RIGHT = {"a": set(), "b": {"d0", "d1", "d2"}, "c": {"d0", "d1"}, "d": {"d0"}}


def respond(call):
    if call.mode is not None:  # the fused (contrastive) decode
        return "Answer: 7"
    return "Answer: 7" if call.qid in RIGHT[call.model] else "Answer: 0"


def fit(toy, models, **params):
    ctx, pool = toy(models, respond, group="g")
    strat = LogitContrastive(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    return strat, ctx, pool


def test_best_dev_model_is_the_expert_and_the_worst_the_amateur(toy):
    strat, ctx, pool = fit(toy, ["a", "b", "c"], temperature=0.3)
    assert strat.fitted["experts"] == ["b"] and strat.fitted["amateurs"] == ["a"]
    # top_1 + 0.2 * (top_1 - bottom_1): 1.2 * expert - 0.2 * amateur, the others 0
    assert strat.fitted["weights"] == pytest.approx([-0.2, 1.2, 0.0])
    assert {c.qid[0] for c in pool.calls} == {"d"} and all(c.mode is None for c in pool.calls)
    pool.calls.clear()
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(strat.solve(ctx.example(ex), ex))
    [call] = pool.calls
    assert call.model == "g" and call.mode == "contrastive"
    assert call.weights == pytest.approx([-0.2, 1.2, 0.0])
    assert call.params.temperature == 0.3 and call.params.top_p == 1.0
    assert ans.meta["experts"] == ["b"]


def test_the_decoder_gets_expert_minus_amateur_with_the_right_sign(toy):
    strat, _, _ = fit(toy, ["a", "b", "c"])
    logps = torch.log_softmax(torch.randn(3, 2, 11), dim=-1)
    got = get_combine("contrastive")(logps, torch.tensor(strat.fitted["weights"]))
    want = 1.2 * logps[1] - 0.2 * logps[0]
    assert torch.allclose(got, want, atol=1e-6)
    # the sign: where the expert is indifferent (uniform), the amateur's least likely token wins
    logps[1] = torch.full((2, 11), -torch.log(torch.tensor(11.0)))
    got = get_combine("contrastive")(logps, torch.tensor(strat.fitted["weights"]))
    assert torch.equal(got.argmax(-1), logps[0].argmin(-1))


def test_top_k_and_ties():
    # ranked best first: b, c, d, a; k = 2: b gets 1 + lam, c lam, d and a -lam
    assert contrast_weights([1, 2, 3, 0], 4, 2, 0.5) == [-0.5, 1.5, 0.5, -0.5]
    assert contrast_weights([0, 1], 2, 1, 0.2) == pytest.approx([1.2, -0.2])


def test_k_two_and_equal_accuracy_keep_the_job_order(toy):
    strat, _, _ = fit(toy, ["a", "b", "c", "d"], k=2, lambda_=0.5)
    assert strat.fitted["weights"] == pytest.approx([-0.5, 1.5, 0.5, -0.5])

    ctx, _ = toy(["x", "y", "z"], lambda c: "Answer: 7", group="g")  # all equally good
    s = LogitContrastive()
    asyncio.run(s.fit_checked(ctx, ctx.task.dev))
    assert s.fitted["experts"] == ["x"] and s.fitted["amateurs"] == ["z"]


def test_errors(toy):
    ctx, _ = toy(["a", "b", "c"], respond, group="g")
    with pytest.raises(ValueError, match="k=2 needs at least 4 models"):
        asyncio.run(LogitContrastive({"k": 2}).fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(LogitContrastive().solve(ctx.example(ex), ex))
    ctx2, _ = toy(["a", "b"], respond)  # no logit group
    s = LogitContrastive()
    asyncio.run(s.fit_checked(ctx2, ctx2.task.dev))
    with pytest.raises(ValueError, match="needs a logit group"):
        asyncio.run(s.solve(ctx2.example(ex), ex))
