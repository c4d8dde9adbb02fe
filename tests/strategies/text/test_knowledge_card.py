import asyncio
import re

import pytest

from moco_ray.strategies.text.knowledge_card import KnowledgeCard

MODELS = ["a", "b", "c"]
RELEVANCE = {"a": 0.1, "b": 2.0, "c": 1.0}  # log P(Yes) - log P(No) per card's author


def respond_for(good):
    def respond(call):
        if "writes background knowledge" in call.text:
            return f"card-{call.model}"
        if "with the help of the knowledge" in call.text:
            return f"final by {call.model} Answer: 7"
        return f"Answer: {'7' if call.model == good else '0'}"  # answering alone (dev)
    return respond


def scorer(model, text, continuation):
    author = re.search(r"Knowledge:\ncard-(\w+)", text).group(1)
    return RELEVANCE[author] if continuation == "Yes" else 0.0


def run(toy, params, good="c", **kw):
    ctx, pool = toy(MODELS, respond_for(good), scorer=scorer, **kw)
    strat = KnowledgeCard(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    ex = ctx.task.test.examples[0]
    pool.calls.clear()
    return asyncio.run(strat.solve(ctx.example(ex), ex)), pool, strat


def final_call(pool):
    [c] = [c for c in pool.calls if "with the help of the knowledge" in c.text]
    return c


def cards_in(text):
    return re.findall(r"card-(\w)", text)


def test_reference_default_keeps_every_card_for_the_dev_best_model(toy):
    for good in ("b", "c"):
        ans, pool, strat = run(toy, {}, good=good)
        assert strat.fitted["main_model"] == good
        assert sorted(c.model for c in pool.calls if "background" in c.text) == MODELS
        final = final_call(pool)
        assert final.model == good and cards_in(final.text) == MODELS  # its own card too
        assert final.prompt[0]["role"] == "system" and "Question t0" in final.text
        assert pool.scored == []  # no selection without top_k
        assert ans.output == f"final by {good} Answer: 7"


def test_relevance_selector_keeps_the_top_k_most_relevant_first(toy):
    ans, pool, _ = run(toy, {"top_k": 2})
    assert cards_in(final_call(pool).text) == ["b", "c"]  # a (least relevant) dropped
    assert ans.meta["selected"] == ["b", "c"]
    assert ans.meta["relevance"] == pytest.approx(RELEVANCE)
    # the main model judges each card once, by its likelihood of "Yes" vs "No"
    assert sorted(cards_in(t)[0] for _, t, _ in pool.scored) == MODELS
    assert {(m, tuple(c)) for m, _, c in pool.scored} == {("c", ("Yes", "No"))}
    _, pool1, _ = run(toy, {"top_k": 1})
    assert cards_in(final_call(pool1).text) == ["b"]


def test_exclude_self_drops_the_main_models_card(toy):
    _, pool, _ = run(toy, {"exclude_self": True})
    assert sorted(c.model for c in pool.calls if "background" in c.text) == ["a", "b"]
    assert cards_in(final_call(pool).text) == ["a", "b"]


def test_relevance_model_may_be_any_pool_model(toy):
    _, pool, _ = run(toy, {"top_k": 1, "relevance_model": "judge", "main_model": "a"},
                     pool_models=MODELS + ["judge"])
    assert {m for m, _, _ in pool.scored} == {"judge"}
    assert final_call(pool).model == "a" and cards_in(final_call(pool).text) == ["b"]
    with pytest.raises(ValueError, match="relevance_model='nope'"):
        run(toy, {"top_k": 1, "relevance_model": "nope"})
    with pytest.raises(ValueError, match="main_model='zz' is not among"):
        run(toy, {"main_model": "zz"})
