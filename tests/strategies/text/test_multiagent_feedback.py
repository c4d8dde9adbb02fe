import asyncio
import re
from collections import Counter

import pytest

from moco_ray.strategies.text.multiagent_feedback import MultiagentFeedback

MODELS = ["a", "b", "c"]


def feedback_pool(toy, good="b", **kw):
    """Answers name their author and round ('a-r1'); feedback names its reviewer and the answer
    it reviews ('fb(c->a-r0)'); on dev only `good` answers right; summaries repeat the answer of
    the first listed assistant."""
    rounds: Counter = Counter()

    def respond(call):
        t = call.text
        if "Give constructive feedback" in t:
            reviewed = re.search(r"answer:\n(\S+)", t).group(1)
            return f"fb({call.model}->{reviewed})"
        if "write one final answer" in t:
            return f"summary by {call.model} Answer: 7"
        if call.qid.startswith("d"):
            return f"Answer: {'7' if call.model == good else '0'}"
        key = (call.model, call.qid)
        rounds[key] += 1
        return f"{call.model}-r{rounds[key] - 1} Answer: 5"

    return toy(MODELS, respond, **kw)


def run(strat, ctx, i=0):
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[i]
    return asyncio.run(strat.solve(ctx.example(ex), ex))


def test_each_author_revises_with_feedback_on_its_own_last_answer(toy):
    ctx, pool = feedback_pool(toy, n_test=6)
    strat = MultiagentFeedback({"feedback_count": 1})
    reviewers_seen = set()
    for i in range(6):
        pool.calls.clear()
        ans = run(strat, ctx, i)
        qid = f"t{i}"
        for r in (1, 2):
            for m in MODELS:
                fb = [c for c in pool.calls if c.qid == qid and "Give constructive" in c.text
                      and f"answer:\n{m}-r{r - 1} " in c.text]
                assert len(fb) == 1 and fb[0].model != m  # one reviewer, never the author
                reviewers_seen.add((m, fb[0].model))
                [rev] = [c for c in pool.calls if c.model == m and "Use the feedback" in c.text
                         and f"Your previous answer:\n{m}-r{r - 1} " in c.text]
                assert f"fb({fb[0].model}->{m}-r{r - 1})" in rev.text
                # no feedback meant for another author, and none from another round
                assert len(re.findall(r"fb\(", rev.text)) == 1
                assert rev.prompt[0]["role"] == "system"  # the task's format is kept
            assert {c.model for c in pool.calls if "Give constructive" in c.text} <= set(MODELS)
        [summary] = [c for c in pool.calls if "write one final answer" in c.text]
        assert summary.model == "b"  # best single model on dev
        assert all(f"{m}-r2 Answer" in summary.text for m in MODELS)
        assert "-r1 " not in summary.text
        assert ans.output == "summary by b Answer: 7" and len(ans.meta["rounds"]) == 3
    # reviewers are drawn at random among the other models, not fixed
    assert len(reviewers_seen) > len(MODELS)


def test_default_reviewers_are_all_other_models(toy):
    ctx, pool = feedback_pool(toy)
    ans = run(MultiagentFeedback(), ctx)  # reference: feedback_count 3 -> all 2 others
    for r, reviews in enumerate(ans.meta["feedback"], start=1):
        for m in MODELS:
            assert sorted(reviews[m]) == sorted(set(MODELS) - {m})
            assert all(t == f"fb({rv}->{m}-r{r - 1})" for rv, t in reviews[m].items())
    assert len([c for c in pool.calls if "Give constructive" in c.text]) == 2 * 3 * 2


def test_summarizer_is_best_on_dev_and_fit_sees_dev_only(toy):
    for good in ("a", "c"):
        ctx, pool = feedback_pool(toy, good=good)
        strat = MultiagentFeedback({"rounds": 1})
        asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
        assert strat.fitted["summarizer"] == good
        assert strat.fitted["dev_accuracy"][good] == 1.0
        assert all(c.qid.startswith("d") for c in pool.calls)


def test_errors_name_the_problem(toy):
    ctx, _ = feedback_pool(toy)
    with pytest.raises(ValueError, match="summarizer='zz' is not among"):
        asyncio.run(MultiagentFeedback({"summarizer": "zz"}).fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        asyncio.run(MultiagentFeedback().solve(ctx.example(ex), ex))
    solo, _ = toy(["a"], lambda c: "Answer: 1")
    strat = MultiagentFeedback({"summarizer": "a"})
    asyncio.run(strat.fit_checked(solo, solo.task.dev))
    with pytest.raises(ValueError, match="at least 2 models"):
        asyncio.run(strat.solve(solo.example(ex), ex))
