import asyncio
import json
import math

import pytest
import torch

from moco_ray.engines.lockstep import get_combine
from moco_ray.records import Generation, TokenLogprobs
from moco_ray.strategies.logit.fusion_route import FusionRoute, step_features


def step(p1: float) -> TokenLogprobs:
    """A step whose top-1 probability is p1, the rest spread over four other tokens."""
    rest = math.log((1 - p1) / 4)
    return TokenLogprobs(token_id=1, logprob=math.log(p1),
                         top={1: math.log(p1), 2: rest, 3: rest, 4: rest, 5: rest})


def rollout(p1: float, right: bool) -> Generation:
    return Generation(text="Answer: 7" if right else "Answer: 0", token_ids=[1, 1, 1],
                      finish_reason="stop", prompt_tokens=3, completion_tokens=3,
                      logprobs=[step(p1)] * 3)


def fitted(toy, script, **params):
    ctx, pool = toy(["a", "b"], script, n_dev=8, group="g")
    strat = FusionRoute(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    return strat, ctx, pool


def logps_with(p1s: list[float], vocab: int = 12) -> torch.Tensor:
    """[models, 1, vocab] log-probs: model m puts p1s[m] on its own token m, the rest evenly."""
    rows = []
    for m, p1 in enumerate(p1s):
        p = torch.full((vocab,), (1 - p1) / (vocab - 1))
        p[m] = p1
        rows.append(p.log())
    return torch.stack(rows)[:, None, :]


def expert_of(strat, logps: torch.Tensor) -> int:
    """Which model's distribution the decoder follows with the fitted router."""
    out = get_combine(strat.mode(0.0))(logps, torch.tensor(strat.fitted["biases"]))
    [m] = [m for m in range(logps.shape[0]) if torch.allclose(out[0], logps[m, 0])]
    return m


def test_router_learns_to_follow_the_confident_model(toy):
    # Right exactly when confident, whichever model: a on d0-d3, b on d4-d7.
    def script(call):
        first = int(call.qid[1:]) < 4
        sure = first if call.model == "a" else not first
        return rollout(0.9 if sure else 0.3, sure)

    strat, ctx, pool = fitted(toy, script, temperature=0.4)
    coef, biases = strat.fitted["coef"], strat.fitted["biases"]
    assert coef[0] > 1.0  # top-1 probability predicts a right answer
    assert biases[0] == pytest.approx(biases[1], abs=1e-3)  # neither model is better per se
    for c in pool.calls:  # greedy rollouts with the top-k the entropy feature uses
        assert c.params.logprobs == 20 and c.params.temperature == 0.0 and c.qid[0] == "d"
    # per step, the decoder follows whichever model is the more confident there
    assert expert_of(strat, logps_with([0.9, 0.4])) == 0
    assert expert_of(strat, logps_with([0.4, 0.9])) == 1
    pool.calls.clear()
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(strat.solve(ctx.example(ex), ex))
    [call] = pool.calls
    assert call.model == "g" and call.mode.startswith("route:")
    sent = json.loads(call.mode.partition(":")[2])
    assert sent == {"coef": coef, "top_k": 20, "complement": 0.0}
    assert call.weights == biases and call.params.temperature == 0.4
    assert ans.meta["mode"] == call.mode


def test_router_learns_which_model_to_trust(toy):
    # a is always right, b always wrong, at the same confidences: the bias decides.
    def script(call):
        return rollout(0.9 if int(call.qid[1:]) % 2 else 0.5, call.model == "a")

    strat, _, _ = fitted(toy, script)
    biases = strat.fitted["biases"]
    assert biases[0] > biases[1] + 1.0
    assert expert_of(strat, logps_with([0.6, 0.6])) == 0
    assert expert_of(strat, logps_with([0.5, 0.9])) == 0  # b's confidence is no reason


def test_no_signal_falls_back_to_the_most_confident_model(toy):
    strat, _, _ = fitted(toy, lambda c: rollout(0.8, True))
    assert strat.fitted["coef"] == [1.0, 0.0] and strat.fitted["note"] == "no signal on dev"
    assert expert_of(strat, logps_with([0.5, 0.7])) == 1


def test_complement_is_picked_on_dev(toy):
    def script(call):
        if call.mode is not None:  # fused decode: right only with complement 0.5
            return "Answer: 7" if json.loads(call.mode[6:])["complement"] == 0.5 else "x"
        return rollout(0.8, call.model == "a")

    strat, _, pool = fitted(toy, script, complement_grid=[0.0, 0.5, 1.0], dev_size=3)
    assert strat.fitted["complement"] == 0.5
    assert strat.fitted["complement_dev_scores"] == {"0.0": 0.0, "0.5": 1.0, "1.0": 0.0}
    fused = [c for c in pool.calls if c.mode is not None]
    assert len(fused) == 9 and {c.qid for c in fused} == {"d0", "d1", "d2"}
    for q in ("d0", "d1", "d2"):  # one seed per example: candidates differ only in c
        assert len({c.params.seed for c in fused if c.qid == q}) == 1


def test_step_features_and_errors(toy):
    mp, ent = step_features(step(0.6), 20)
    assert mp == pytest.approx(0.6) and ent == pytest.approx(
        -(0.6 * math.log(0.6) + 4 * 0.1 * math.log(0.1)))
    assert step_features(step(0.6), 1) == (pytest.approx(0.6), pytest.approx(0.0))
    ctx, _ = toy(["a", "b"], lambda c: "Answer: 7", group="g")  # no logprobs
    with pytest.raises(RuntimeError, match="no logprobs"):
        asyncio.run(FusionRoute().fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(FusionRoute().solve(ctx.example(ex), ex))
