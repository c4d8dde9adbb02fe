import asyncio

import pytest
from pydantic import ValidationError

from moco_ray.strategies.logit.logit_fusion import LogitFusion, weight_grid


def favour_b(call):
    """The fused answer is right only when model b (second) outweighs model a."""
    return "Answer: 7" if call.weights[1] > call.weights[0] else "Answer: 0"


def test_average_mode_sends_uniform_weights_and_the_temperature(toy):
    ctx, pool = toy(["a", "b", "c"], lambda c: "Answer: 7", group="g")
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(LogitFusion({"temperature": 0.3}).solve(ctx.example(ex), ex))
    [call] = pool.calls
    assert call.model == "g" and call.mode == "fusion"
    assert call.weights == pytest.approx([1 / 3] * 3)
    assert call.params.temperature == 0.3 and call.params.top_p == 1.0
    assert ans.output == "Answer: 7" and ans.meta["weights"] == call.weights


def test_fixed_weights_are_used_and_checked(toy):
    ctx, pool = toy(["a", "b"], favour_b, group="g")
    strat = LogitFusion({"weights": [0.2, 0.8]})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    assert pool.calls == []  # nothing to tune
    ex = ctx.task.test.examples[0]
    assert asyncio.run(strat.solve(ctx.example(ex), ex)).output == "Answer: 7"
    with pytest.raises(ValueError, match="3 values for 2 models"):
        asyncio.run(LogitFusion({"weights": [1, 1, 1]}).fit_checked(ctx, ctx.task.dev))


def test_optimized_mode_tunes_weights_on_dev(toy):
    ctx, pool = toy(["a", "b"], favour_b, n_dev=6, group="g")
    strat = LogitFusion({"mode": "optimized", "dev_size": 3})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    assert strat.fitted["weights"] == [0.0, 1.0]  # first grid point where b outweighs a
    assert strat.fitted["dev_scores"][str([0.5, 0.5])] == 0.0
    assert {c.qid for c in pool.calls} == {"d0", "d1", "d2"}
    # every candidate of an example gets the same seed: they differ only in weights
    for q in ("d0", "d1", "d2"):
        assert len({c.params.seed for c in pool.calls if c.qid == q}) == 1
    ex = ctx.task.test.examples[0]
    assert asyncio.run(strat.solve(ctx.example(ex), ex)).output == "Answer: 7"


def test_weight_grid_and_param_errors():
    grid = weight_grid(2, 4)
    assert grid[0] == (0.5, 0.5) and len(grid) == 5 and all(sum(w) == 1 for w in grid)
    assert len(weight_grid(3, 4)) == 1 + 15
    with pytest.raises(ValidationError, match="not both"):
        LogitFusion({"mode": "optimized", "weights": [1, 1]})
    with pytest.raises(ValidationError, match="must divide 1"):
        LogitFusion({"grid_step": 0.3})
    with pytest.raises(ValidationError, match="positive sum"):
        LogitFusion({"weights": [1, -1]})


def test_needs_a_logit_group(toy):
    ctx, _ = toy(["a", "b"], favour_b)  # no group in the job
    ex = ctx.task.test.examples[0]
    with pytest.raises(ValueError, match="needs a logit group"):
        asyncio.run(LogitFusion().solve(ctx.example(ex), ex))
