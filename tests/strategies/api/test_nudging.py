import asyncio
import math
import re

import pytest
from pydantic import ValidationError

from moco_ray.records import Generation, TokenLogprobs
from moco_ray.strategies.api.nudging import Nudging


def partial(call) -> str:
    """The answer so far: what follows the rendered prompt (the scripted pool renders a chat
    prompt as its contents, so the question line ends it)."""
    return re.split(r"Question \w+", call.text, maxsplit=1)[1]


def token(text: str, prob: float = 0.9, end: bool = False) -> Generation:
    """One scripted token with top-1 probability `prob`; `end`: the model emitted EOS."""
    if end:
        return Generation(text="", token_ids=[2], finish_reason="stop", prompt_tokens=1,
                          completion_tokens=1,
                          logprobs=[TokenLogprobs(token_id=2, logprob=math.log(prob),
                                                  top={2: math.log(prob)})])
    lp = math.log(prob)
    return Generation(text=text, token_ids=[5], finish_reason="length", prompt_tokens=1,
                      completion_tokens=1,
                      logprobs=[TokenLogprobs(token_id=5, logprob=lp,
                                              top={5: lp, 6: math.log(min(prob, 1 - prob) / 2)})])


# Base top-1 probability per step, and the nudger's token per step (no space: mid-word).
PROBS = [0.9, 0.9, 0.3, 0.9, 0.4, 0.39, 0.41, 0.9, 0.1]
NUDGE = {6: "n"}


def step_of(call) -> int:
    return len(re.findall(r"[BNn]", partial(call)))


def scripted(call):
    s = step_of(call)
    if call.model == "base":
        return token(" B", PROBS[s])
    return token(NUDGE.get(s, " N"), 0.5)


def run(strat, ctx, ex):
    return asyncio.run(strat.solve(ctx.example(ex), ex))


def test_nudger_writes_exactly_where_the_base_top1_is_below_gamma(toy):
    ctx, pool = toy(["base", "nudger"], scripted)
    strat = Nudging({"max_tokens": len(PROBS), "temperature": 0.5})
    ex = ctx.task.test.examples[0]
    ans = run(strat, ctx, ex)
    # step 0: always the nudger; then the nudger iff top-1 < 0.4 (0.4 itself is the base's),
    # and step 6 stays with the nudger although the base is sure: its token "n" ends no word
    assert ans.meta["sources"] == "nbnbbnnbn"
    assert ans.output == " N B N B B Nn B N"
    assert ans.meta["nudged_tokens"] == 5 and ans.meta["gamma"] == 0.4
    # the nudger is only asked when its token can be chosen: while nudging, or below gamma
    asked = sorted(step_of(c) for c in pool.of("nudger"))
    assert asked == [0, 1, 2, 3, 5, 6, 7, 8]
    assert [step_of(c) for c in pool.of("base")] == list(range(len(PROBS)))
    for c in pool.calls:  # one token per call, with logprobs, at the given temperature
        assert c.params.max_tokens == 1 and c.params.logprobs == 1
        assert c.params.temperature == 0.5 and c.params.top_p == 1.0
        assert isinstance(c.prompt, str)  # raw continuation of the rendered prompt
    # a higher gamma hands more steps to the nudger
    ctx2, _ = toy(["base", "nudger"], scripted)
    hi = run(Nudging({"max_tokens": len(PROBS), "gamma": 0.95}), ctx2, ex)
    assert hi.meta["sources"] == "n" * len(PROBS)


def test_decoding_ends_when_the_chosen_model_emits_eos(toy):
    def r(call):
        s = step_of(call)
        if call.model == "base":
            # EOS at step 0 is not chosen (the first token is the nudger's); at step 2 it is
            return token(" B", 0.9, end=s in (0, 2))
        return token(" N", 0.5)

    ctx, _ = toy(["base", "nudger"], r)
    ex = ctx.task.test.examples[0]
    ans = run(Nudging({"max_tokens": 8}), ctx, ex)
    assert ans.output == " N B" and ans.meta["sources"] == "nb"

    def r2(call):  # the nudger ends while it is writing (its EOS has no space: always taken)
        if call.model == "base":
            return token(" B", 0.1)
        return token(" N", 0.5, end=step_of(call) == 3)

    ctx2, _ = toy(["base", "nudger"], r2)
    assert run(Nudging({"max_tokens": 8}), ctx2, ex).output == " N N N"


def test_search_picks_gamma_and_nudger_on_dev(toy):
    # The base (top-1 0.35 everywhere) always writes " 0"; the good nudger writes " Answer:",
    # " 7", then EOS. Only gamma > 0.35 lets the nudger write " 7", only 'good' writes 7.
    def r(call):
        done = partial(call)
        if call.model == "base":
            return token(" 0", 0.35)
        if done == "":
            return token(" Answer:", 0.5)
        if done == " Answer:":
            return token(" 7" if call.model == "good" else " 3", 0.5)
        return token("", 0.5, end=True)

    ctx, pool = toy(["base", "bad", "good"], r, n_dev=3)
    strat = Nudging({"gamma": 0.2, "nudging_model": "bad", "search_gamma": True,
                     "search_nudging": True, "max_tokens": 4})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    assert (strat.fitted["gamma"], strat.fitted["nudging_model"]) == (0.4, "good")
    assert strat.fitted["dev_scores"]["0.2|good"] == 0.0   # the base overrules " 7"
    assert strat.fitted["dev_scores"]["0.5|good"] == 1.0   # as good, but later in the grid
    assert strat.fitted["dev_scores"]["0.4|bad"] == 0.0
    assert {c.qid for c in pool.calls} == {"d0", "d1", "d2"}  # tuning saw dev only
    ex = ctx.task.test.examples[0]
    assert run(strat, ctx, ex).output == " Answer: 7"


def test_roles_and_errors(toy):
    ctx, _ = toy(["a", "b", "c"], scripted)
    ex = ctx.task.test.examples[0]
    with pytest.raises(ValueError, match="not among this job's models"):
        run(Nudging({"nudging_model": "zzz"}), ctx, ex)
    with pytest.raises(ValidationError, match="two different models"):
        Nudging({"base_model": "a", "nudging_model": "a"})
    with pytest.raises(ValidationError, match="must lie in"):
        Nudging({"gamma_grid": [0.0, 0.5]})
    with pytest.raises(RuntimeError, match="needs fit"):
        run(Nudging({"search_gamma": True}), ctx, ex)
    ctx1, _ = toy(["solo"], scripted)
    with pytest.raises(ValueError, match="at least 2 models"):
        asyncio.run(Nudging().fit_checked(ctx1, ctx1.task.dev))
    ctx2, _ = toy(["base", "nudger"], lambda c: "x")  # no logprobs from the engine
    with pytest.raises(RuntimeError, match="no logprobs"):
        run(Nudging(), ctx2, ex)
