"""Pure logic of the OpenAI layer: request -> SamplingParams, refusals, response shapes."""
from __future__ import annotations

import pytest

from moco_ray.pool.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    chat_response,
    completion_response,
)
from moco_ray.records import Generation, TokenLogprobs

VOCAB = {1: "Hello", 2: " world", 3: "!"}


def decode(i: int) -> str:
    return VOCAB[i]


def test_chat_request_maps_sampling_fields():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                temperature=0.0, top_p=0.5, max_tokens=7, stop="\n", seed=3,
                                logprobs=True, top_logprobs=2, user="ignored-field")
    p = req.params()
    assert (p.temperature, p.top_p, p.max_tokens, p.stop, p.seed, p.logprobs) == \
        (0.0, 0.5, 7, ["\n"], 3, 2)
    # max_completion_tokens (the newer name) wins over max_tokens
    req2 = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 max_tokens=7, max_completion_tokens=3)
    assert req2.params().max_tokens == 3
    # logprobs off -> no top-k asked of the engine; OpenAI's default temperature is 1
    req3 = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 top_logprobs=5)
    assert req3.params().logprobs is None and req3.params().temperature == 1.0


def test_chat_content_parts_become_text():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}},
        {"type": "text", "text": "b"}]}])
    assert req.messages[0].as_prompt_message() == {"role": "user", "content": "ab"}


@pytest.mark.parametrize("field,value", [("n", 2), ("stream", True),
                                         ("presence_penalty", 0.5)])
def test_unsupported_values_are_refused_by_name(field, value):
    req = CompletionRequest(model="m", prompt="x", **{field: value})
    with pytest.raises(OpenAIError, match=field) as e:
        req.params()
    assert e.value.status == 400 and e.value.param == field


def test_completion_refuses_echo_and_accepts_best_of_one():
    assert CompletionRequest(model="m", prompt="x", best_of=1).params().max_tokens == 64
    with pytest.raises(OpenAIError, match="echo"):
        CompletionRequest(model="m", prompt="x", echo=True).params()
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]


def _gen(version=3) -> Generation:
    lps = [TokenLogprobs(token_id=1, logprob=-0.1, top={1: -0.1, 2: -2.5}),
           TokenLogprobs(token_id=2, logprob=-0.7, top={3: -1.0, 2: -0.7})]
    return Generation(text="Hello world", token_ids=[1, 2], finish_reason="length",
                      prompt_tokens=5, completion_tokens=2, logprobs=lps, model="m",
                      version=version)


def test_chat_response_shape_usage_and_logprobs():
    r = chat_response("m", [_gen()], decode).model_dump()
    assert r["object"] == "chat.completion" and r["model"] == "m"
    assert r["system_fingerprint"] == "m-v3"
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    ch = r["choices"][0]
    assert ch["message"] == {"role": "assistant", "content": "Hello world"}
    assert ch["finish_reason"] == "length"
    toks = ch["logprobs"]["content"]
    assert [t["token"] for t in toks] == ["Hello", " world"]
    assert toks[1]["bytes"] == list(b" world")
    # alternatives sorted best first
    assert [a["token"] for a in toks[1]["top_logprobs"]] == [" world", "!"]


def test_completion_response_logprobs_and_offsets():
    gens = [_gen(), _gen().model_copy(update={"logprobs": None, "text": "x"})]
    r = completion_response("m", gens, decode).model_dump()
    assert r["object"] == "text_completion"
    assert [c["index"] for c in r["choices"]] == [0, 1]
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == ["Hello", " world"] and lp["text_offset"] == [0, 5]
    assert lp["top_logprobs"][0] == {"Hello": -0.1, " world": -2.5}
    assert r["choices"][1]["logprobs"] is None
    assert r["usage"]["total_tokens"] == 14


def test_bounds_on_prompts_and_max_tokens():
    req = CompletionRequest(model="m", prompt=["a", "b", "c"], max_tokens=10)
    assert req.prompts(3) == ["a", "b", "c"] and req.params(10).max_tokens == 10
    with pytest.raises(OpenAIError, match="at most 2") as e:
        req.prompts(2)
    assert e.value.status == 400 and e.value.param == "prompt"
    with pytest.raises(OpenAIError, match="max_tokens<=9") as e:
        req.params(9)
    assert e.value.status == 400 and e.value.param == "max_tokens"
    with pytest.raises(OpenAIError, match="empty"):
        CompletionRequest(model="m", prompt=[]).prompts()
    # no bound given: as before (engine default when max_tokens is not sent)
    assert CompletionRequest(model="m", prompt="x").params().max_tokens == 64
    assert CompletionRequest(model="m", prompt="x").params(8).max_tokens == 8
