"""The pool end to end on a real local Ray + Serve: a vLLM and an HF tiny model, a logit group of
both; handles, the picklable client, OpenAI HTTP (the `openai` package and httpx), shutdown."""
from __future__ import annotations

import asyncio
import pickle

import httpx
import openai
import pytest
import ray
from ray import serve

from moco_ray.config import ConfigError, LogitGroupSpec, ModelSpec, PoolConfig
from moco_ray.pool import ModelPool, ServeClient
from moco_ray.records import Generation, SamplingParams, Score

MODELS = ["tiny-vllm", "tiny-hf"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
CHAT = [{"role": "user", "content": "What is the answer?"}]


def test_health_reports_every_app_running(pool):
    assert pool.health() == {"tiny-vllm": "RUNNING", "tiny-hf": "RUNNING", "duo": "RUNNING"}
    apps = serve.status().applications
    assert {"pooltest-tiny-vllm", "pooltest-tiny-hf", "pooltest-duo"} <= set(apps)


@pytest.mark.parametrize("model", MODELS)
def test_generate_through_handle_is_stamped_and_greedy_repeats(pool, model):
    h = pool.handle(model)
    info = h.info.remote().result()
    assert info["name"] == model and info["engine"] == model.split("-")[1]
    gens = h.generate.remote(["the answer is", CHAT], GREEDY).result()
    assert len(gens) == 2 and all(isinstance(g, Generation) for g in gens)
    for g in gens:
        assert g.model == model and g.version == info["version"]
        assert g.prompt_tokens > 0 and 1 <= g.completion_tokens <= 8
        assert len(g.token_ids) == g.completion_tokens and g.engine_seconds > 0
    again = h.generate.remote(["the answer is"], GREEDY).result()
    assert again[0].token_ids == gens[0].token_ids  # greedy is deterministic


def test_client_generate_score_render(pool):
    client = pool.client()
    assert client.models == MODELS

    async def go():
        out = {}
        for m in MODELS:
            gens = await client.generate(m, ["one two"], GREEDY)
            scores = await client.score(m, "one two", [" three", " three four five"])
            out[m] = (gens, scores, client.render(m, CHAT))
        return out

    out = asyncio.run(go())
    for m, (gens, scores, rendered) in out.items():
        assert gens[0].model == m
        assert all(isinstance(s, Score) for s in scores)
        assert scores[1].num_tokens > scores[0].num_tokens
        assert scores[0].sum_logprob < 0
        # the tiny chat template: role tags, then the assistant's turn opened
        assert "<|user|>" in rendered and rendered.endswith("<|assistant|>\n")
        assert "What is the answer?" in rendered


def test_client_pickles_into_another_process(pool):
    client = pickle.loads(pickle.dumps(pool.client()))
    assert client._handles == {}  # handles are made where the client is used

    @ray.remote(num_cpus=0)
    def use(c: ServeClient) -> list[str]:
        async def go():
            texts = []
            for m in c.models:
                [g] = await c.generate(m, ["one two"], GREEDY)
                texts.append(g.text)
            # render is sync but called from the coordinator's event loop: must not refuse
            texts.append(c.render("tiny-hf", "raw text"))
            return texts

        return asyncio.run(go())

    remote = ray.get(use.remote(client), timeout=120)
    local = [pool.handle(m).generate.remote(["one two"], GREEDY).result()[0].text
             for m in MODELS]
    assert remote[:2] == local
    assert remote[2].endswith("raw text")


def test_client_names_unknown_models(pool):
    with pytest.raises(KeyError, match="tiny-vllm"):
        asyncio.run(pool.client().generate("nope", ["x"], GREEDY))
    with pytest.raises(KeyError, match="duo"):
        pool.handle("nope")


def test_concurrent_requests_all_succeed(pool):
    h = pool.handle("tiny-vllm")
    prompts = [f"{i} plus {i} equals" for i in range(24)]

    async def go():
        return await asyncio.gather(*[h.generate.remote([p], GREEDY) for p in prompts])

    results = asyncio.run(go())
    assert len(results) == 24 and all(len(r) == 1 and r[0].completion_tokens >= 1
                                      for r in results)
    # batching did not mix prompts up: each equals the same prompt asked alone
    alone = h.generate.remote([prompts[5]], GREEDY).result()[0]
    assert results[5][0].token_ids == alone.token_ids


@pytest.mark.parametrize("model", MODELS)
def test_openai_client_chat_and_completions(pool, model):
    api = openai.OpenAI(base_url=pool.url(model), api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list().data] == [model]
    chat = api.chat.completions.create(model=model, messages=CHAT, max_tokens=6,
                                       temperature=0.0, logprobs=True, top_logprobs=3)
    assert chat.object == "chat.completion" and chat.model == model
    u = chat.usage
    assert u.prompt_tokens > 0 and 1 <= u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    lp = chat.choices[0].logprobs.content
    assert len(lp) == u.completion_tokens and all(len(t.top_logprobs) == 3 for t in lp)
    assert all(t.logprob <= 0 for t in lp)
    # greedy over HTTP = greedy through the handle
    comp = api.completions.create(model=model, prompt="one two", max_tokens=8, temperature=0.0)
    handle_text = pool.handle(model).generate.remote(["one two"], GREEDY).result()[0].text
    assert comp.choices[0].text == handle_text
    assert comp.usage.completion_tokens >= 1
    assert comp.system_fingerprint.startswith(f"{model}-v")


def test_openai_errors_name_the_problem(pool):
    api = openai.OpenAI(base_url=pool.url("tiny-vllm"), api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="tiny-vllm"):
        api.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n=2"):
        api.completions.create(model="tiny-vllm", prompt="x", max_tokens=2, n=2)
    r = httpx.post(pool.url("tiny-vllm") + "/completions",
                   json={"model": "tiny-vllm", "prompt": "x", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    # bounds from the pool config: max_tokens by max_model_len (256), prompts per request (128)
    with pytest.raises(openai.BadRequestError, match="limit of 256"):
        api.completions.create(model="tiny-vllm", prompt="x", max_tokens=257)
    with pytest.raises(openai.BadRequestError, match="at most 128"):
        api.completions.create(model="tiny-vllm", prompt=["x"] * 129, max_tokens=1)


def test_httpx_completion_with_seed_and_stop(pool):
    url = pool.url("tiny-hf") + "/completions"
    body = {"model": "tiny-hf", "prompt": ["one two", "three"], "max_tokens": 12,
            "temperature": 1.0, "seed": 7}
    a, b = (httpx.post(url, json=body, timeout=60).json() for _ in range(2))
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert a["usage"]["prompt_tokens"] > 0
    greedy = httpx.post(url, json={"model": "tiny-hf", "prompt": "one two", "max_tokens": 12,
                                   "temperature": 0.0}, timeout=60).json()["choices"][0]["text"]
    if len(greedy.strip()) > 2:  # stop on a piece of the greedy text: output ends before it
        stop = greedy.strip()[1:3]
        cut = httpx.post(url, json={"model": "tiny-hf", "prompt": "one two", "max_tokens": 12,
                                    "temperature": 0.0, "stop": [stop]},
                         timeout=60).json()["choices"][0]
        assert stop not in cut["text"] and greedy.startswith(cut["text"])
        assert cut["finish_reason"] == "stop"


def test_fused_generate_matches_the_single_model_at_one_hot_weights(pool):
    client = pool.client()
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)

    async def go():
        fused = await client.fused_generate("duo", ["one two", CHAT], params, "fusion",
                                            [0.0, 1.0])
        mixed = await client.fused_generate("duo", ["one two"], params, "fusion", [1.0, 1.0])
        single = await client.generate("tiny-hf", ["one two", CHAT], GREEDY)
        return fused, mixed, single

    fused, mixed, single = asyncio.run(go())
    assert [g.model for g in fused] == ["duo", "duo"]
    assert len(fused[0].logprobs) == fused[0].completion_tokens
    assert all(len(t.top) == 2 for t in fused[0].logprobs)
    # all weight on tiny-hf: the fused decode is that model's own greedy decode
    assert [g.token_ids for g in fused] == [g.token_ids for g in single]
    assert mixed[0].completion_tokens >= 1
    with pytest.raises(KeyError, match="fusion"):
        asyncio.run(client.fused_generate("duo", ["x"], params, "bogus", [1.0, 1.0]))


def test_logit_group_members_stay_on_cpu_without_gpus(pool):
    info = pool.handle("duo").info.remote().result()
    assert info["devices"] == {"tiny-vllm": "cpu", "tiny-hf": "cpu"}


def test_concurrent_fused_calls_decode_as_one_batch(pool):
    """Calls beyond Serve's default of 5 ongoing requests reach the group and share a batch."""
    client = pool.client()
    params = SamplingParams(max_tokens=4, temperature=0.0)

    async def go():
        outs = await asyncio.gather(*(client.fused_generate("duo", [f"word {i}"], params,
                                                            "fusion", [1.0, 1.0])
                                      for i in range(24)))
        return outs, await client.group_handle("duo").info.remote()

    outs, info = asyncio.run(go())
    assert all(len(o) == 1 and o[0].completion_tokens >= 1 for o in outs)
    assert info["largest_batch"] > 5


@pytest.mark.parametrize("model", MODELS)
def test_load_weights_bumps_the_version_in_lineage(pool, tmp_path, model):
    h = pool.handle(model)
    before = h.info.remote().result()
    with pytest.raises(ValueError, match="safetensors"):  # not a checkpoint: refused, kept
        h.load_weights.remote(str(tmp_path)).result()
    assert h.info.remote().result()["version"] == before["version"]
    old = h.generate.remote(["one two"], GREEDY).result()[0]
    version = h.load_weights.remote(before["model_path"]).result()
    assert version == before["version"] + 1
    new = h.generate.remote(["one two"], GREEDY).result()[0]
    assert new.version == version and old.version == before["version"]
    assert new.token_ids == old.token_ids  # same checkpoint, same answers
    r = httpx.post(pool.url(model) + "/completions",
                   json={"model": model, "prompt": "one", "max_tokens": 2}, timeout=60)
    assert r.json()["system_fingerprint"] == f"{model}-v{version}"  # lineage over HTTP too


def test_invalid_config_is_refused_before_anything_deploys(pool):
    bad = PoolConfig(
        name="bad",
        models=[ModelSpec(name="a", path="zoo:no-such-model", engine="hf"),
                ModelSpec(name="b", path="zoo:tiny", engine="hf", num_cpus=1000)],
        logit_groups=[LogitGroupSpec(name="a", models=["a", "b"])])
    before = set(serve.status().applications)
    with pytest.raises(ConfigError) as e:
        ModelPool(bad).start()
    msg = str(e.value)
    assert "no-such-model" in msg and "also a model name" in msg and "CPU" in msg
    assert e.value.problems and len(e.value.problems) == 3
    assert set(serve.status().applications) == before


def test_context_manager_starts_and_removes_its_apps(pool):
    cfg = PoolConfig(name="ctx", models=[ModelSpec(name="solo", path="zoo:tiny-s1", engine="hf",
                                                   max_model_len=128, num_cpus=0.5)])
    with ModelPool(cfg) as p:
        assert p.health() == {"solo": "RUNNING"}
        assert p.http_port == pool.http_port  # joined the running Serve
        [g] = p.handle("solo").generate.remote(["one"], GREEDY).result()
        assert g.model == "solo"
    assert "ctx-solo" not in serve.status().applications
    assert p.health() == {"solo": "NOT_STARTED"}
    assert pool.health()["tiny-hf"] == "RUNNING"  # the other pool is untouched
