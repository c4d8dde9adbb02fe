"""Behaviour both engines share (each test runs on HF and on vLLM, same tiny model)."""
from __future__ import annotations

import asyncio

import pytest

from moco_ray.engines.base import Engine
from moco_ray.models.tokenizer import encode_continuation, encode_prompt
from moco_ray.records import SamplingParams

CHAT = [{"role": "user", "content": "What is 12+7?"}]


async def _gather(*coros):
    # gather inside a coroutine, so its futures belong to the session loop
    return await asyncio.gather(*coros)


def test_is_an_engine(engine):
    assert isinstance(engine, Engine)


def test_generate_counts_and_logprobs(engine, run):
    params = SamplingParams(max_tokens=6, logprobs=3)
    gens = run(engine.generate(["12+7=", CHAT], params))
    assert len(gens) == 2
    for prompt, g in zip(["12+7=", CHAT], gens):
        assert g.prompt_tokens == len(encode_prompt(engine.tokenizer, prompt))
        assert g.completion_tokens == len(g.token_ids) == len(g.logprobs)
        assert 1 <= len(g.token_ids) <= 6
        assert g.finish_reason == ("length" if len(g.token_ids) == 6 else "stop")
        for t, tok in zip(g.logprobs, g.token_ids):
            assert t.token_id == tok
            assert len(t.top) == 3
            # Greedy: the chosen token is the most likely one.
            assert t.logprob == pytest.approx(max(t.top.values()), abs=1e-6)
            assert t.logprob < 0
        assert g.version == engine.version
    no_lp = run(engine.generate(["12+7="], SamplingParams(max_tokens=3)))[0]
    assert no_lp.logprobs is None and no_lp.mean_logprob is None


def test_chat_template_applied(engine, run):
    assert engine.render("raw text") == "raw text"
    text = engine.render(CHAT)
    assert text == "<s><|user|>\nWhat is 12+7?</s>\n<|assistant|>\n"
    g = run(engine.generate([CHAT], SamplingParams(max_tokens=2)))[0]
    assert g.prompt_tokens == len(engine.tokenizer(text, add_special_tokens=False).input_ids)
    with pytest.raises(ValueError, match="prompt must be a string or a list"):
        engine.render([{"content": "no role"}])


def test_stop_string_cuts_text(engine, run):
    params = SamplingParams(max_tokens=24)
    full = run(engine.generate(["the answer is"], params))[0].text
    # A stop string that first occurs inside the text: everything before it must come back.
    cut = next(i for i in range(2, len(full)) if full[i].isalpha() and full[i] not in full[:i])
    g = run(engine.generate(["the answer is"], params.model_copy(update={"stop": [full[cut]]})))[0]
    assert g.finish_reason == "stop"
    assert g.text == full[:cut]
    assert len(g.token_ids) < 24


def test_sampling_honours_seed_temperature_top_p(engine, run):
    greedy = run(engine.generate(["hello"], SamplingParams(max_tokens=12)))[0].token_ids
    hot = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
    a = run(engine.generate(["hello"], hot))[0].token_ids
    b = run(engine.generate(["hello"], hot))[0].token_ids
    c = run(engine.generate(["hello"], hot.model_copy(update={"seed": 8})))[0].token_ids
    assert a == b  # same seed, same sample
    assert a != c and a != greedy
    # A vanishing nucleus keeps only the top token: sampling becomes greedy.
    narrow = hot.model_copy(update={"top_p": 1e-6})
    assert run(engine.generate(["hello"], narrow))[0].token_ids == greedy


def test_concurrent_calls_match_one_by_one(engine, run):
    prompts = ["12+7=", "the answer is", CHAT, "yes or no", "3*4=", "Which is best?"]
    params = [SamplingParams(max_tokens=4 + i, logprobs=2 if i % 2 else None)
              for i in range(len(prompts))]
    alone = [run(engine.generate([p], sp))[0] for p, sp in zip(prompts, params)]
    together = run(_gather(*(engine.generate([p], sp) for p, sp in zip(prompts, params))))
    for a, (b,) in zip(alone, together):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        if a.logprobs:
            assert [t.logprob for t in a.logprobs] == pytest.approx(
                [t.logprob for t in b.logprobs], abs=1e-4)


def test_score(engine, run):
    conts = ["19", "20 apples", " yes"]
    together = run(engine.score("12+7=", conts))
    alone = [run(engine.score("12+7=", [c]))[0] for c in conts]
    for c, s, s1 in zip(conts, together, alone):
        assert s.num_tokens == len(encode_continuation(engine.tokenizer, c))
        assert s.sum_logprob < 0
        assert s.mean_logprob == pytest.approx(s.sum_logprob / s.num_tokens)
        assert s.sum_logprob == pytest.approx(s1.sum_logprob, abs=1e-4)  # padding changes nothing
    with pytest.raises(ValueError, match="has no tokens"):
        run(engine.score("12+7=", [""]))


def test_score_agrees_with_generation_logprobs(engine, run):
    # The greedy continuation's generation logprobs and its score are the same numbers, as long
    # as the decoded text tokenizes back to the same ids.
    for prompt in ["12+7=", "the answer is", "hello", "3*4=", "yes or no"]:
        g = run(engine.generate([prompt], SamplingParams(max_tokens=5, logprobs=0)))[0]
        if encode_continuation(engine.tokenizer, g.text) == g.token_ids:
            s = run(engine.score(prompt, [g.text]))[0]
            assert s.sum_logprob == pytest.approx(sum(t.logprob for t in g.logprobs), abs=1e-4)
            return
    pytest.fail("no greedy continuation round-tripped through the tokenizer")
