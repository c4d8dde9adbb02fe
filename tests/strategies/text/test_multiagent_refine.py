import asyncio
from collections import Counter

import pytest

from moco_ray.strategies.text.multiagent_refine import MultiagentRefine

MODELS = ["a", "b", "c"]


def debate_pool(toy, good_summarizer="b", **kw):
    """Each debate answer names its model and round ('a-r1'); summaries are right only from
    `good_summarizer`."""
    rounds: Counter = Counter()

    def respond(call):
        if "Combine their answers" in call.text:
            return f"Answer: {'7' if call.model == good_summarizer else '0'}"
        key = (call.model, call.qid)
        r = rounds[key]
        rounds[key] += 1
        return f"{call.model}-r{r} Answer: 5"

    return toy(MODELS, respond, **kw)


def test_rounds_show_each_model_the_others_previous_answers(toy):
    ctx, pool = debate_pool(toy)
    strat = MultiagentRefine({"summarizer": "c"})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(strat.solve(ctx.example(ex), ex))

    for m in MODELS:
        debate = [c for c in pool.of(m) if "Combine their answers" not in c.text]
        assert len(debate) == 3  # reference default: 3 rounds
        assert "Your previous answer" not in debate[0].text
        for r in (1, 2):
            prompt = debate[r].text
            assert f"Your previous answer:\n{m}-r{r - 1}" in prompt
            for o in MODELS:
                if o != m:
                    assert f"{o}-r{r - 1} Answer" in prompt  # the others' last round
                    assert f"{o}-r{r - 2} Answer" not in prompt  # nothing older
            assert debate[r].prompt[0]["role"] == "system"  # the task's system prompt is kept
            assert "Question t0" in prompt
    [summary] = [c for c in pool.calls if "Combine their answers" in c.text]
    assert summary.model == "c"
    assert all(f"{m}-r2 Answer" in summary.text for m in MODELS)
    assert ans.output == "Answer: 0" and len(ans.meta["rounds"]) == 3


def test_summarizer_is_chosen_on_a_small_dev_slice(toy):
    for good in ("b", "c"):
        ctx, pool = debate_pool(toy, good_summarizer=good, n_dev=6)
        strat = MultiagentRefine({"rounds": 2, "summarizer_dev_size": 2})
        asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
        assert strat.fitted["summarizer"] == good
        assert strat.fitted["summarizer_dev_scores"][good] == 1.0
        assert {c.qid for c in pool.calls} == {"d0", "d1"}  # only the dev slice, never test
        ex = ctx.task.test.examples[0]
        ans = asyncio.run(strat.solve(ctx.example(ex), ex))
        assert ans.output == "Answer: 7" and ans.meta["summarizer"] == good


def test_bad_summarizer_and_missing_fit_raise(toy):
    ctx, _ = debate_pool(toy)
    with pytest.raises(ValueError, match="not among this job's models"):
        asyncio.run(MultiagentRefine({"summarizer": "zz"}).fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(MultiagentRefine().solve(ctx.example(ex), ex))
