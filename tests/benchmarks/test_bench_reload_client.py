"""The benchmark baseline (`ReloadPerCallClient`): same greedy outputs and scores as the HF
engine on a tiny model, and no model kept in memory between calls."""
from __future__ import annotations

import asyncio
import gc

import pytest
import torch
from bench_baseline import ReloadPerCallClient

from moco_ray import models
from moco_ray.config import EngineSpec
from moco_ray.engines.hf import HFEngine
from moco_ray.records import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [[{"role": "user", "content": "max 3 8 1 ="}],
           [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "the cat sat on"}],
           "one two three"]


@pytest.fixture(scope="module")
def paths(_zoo_cache):
    torch.set_num_threads(1)
    return {"m": models.resolve_path("zoo:tiny"), "n": models.resolve_path("zoo:tiny-s1")}


@pytest.fixture(scope="module")
def engine(paths):
    return HFEngine(EngineSpec(model=paths["m"], kind="hf", dtype="float32", max_model_len=256))


def test_greedy_generations_and_scores_match_the_hf_engine(paths, engine):
    client = ReloadPerCallClient(paths)
    params = GREEDY.model_copy(update={"logprobs": 2})

    async def go():
        want = [(await engine.generate([p], params))[0] for p in PROMPTS]
        got = await client.generate("m", PROMPTS, params)
        s_want = await engine.score(PROMPTS[0], ["8", "3 8"])
        s_got = await client.score("m", PROMPTS[0], ["8", "3 8"])
        return want, got, s_want, s_got

    want, got, s_want, s_got = asyncio.run(go())
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids and g.text == w.text
        assert g.finish_reason == w.finish_reason and g.prompt_tokens == w.prompt_tokens
        assert [t.token_id for t in g.logprobs] == [t.token_id for t in w.logprobs]
        assert [t.logprob for t in g.logprobs] == pytest.approx(
            [t.logprob for t in w.logprobs], abs=1e-4)
        assert g.model == "m"
    assert any(g.token_ids for g in got)
    for w, g in zip(s_want, s_got, strict=True):
        assert g.num_tokens == w.num_tokens
        assert g.sum_logprob == pytest.approx(w.sum_logprob, abs=1e-4)
    # The other model really is another model: the client loads what the call names.
    other = asyncio.run(client.generate("n", PROMPTS[:1], GREEDY))
    assert other[0].token_ids != got[0].token_ids


def test_every_call_loads_and_frees_its_model(paths):
    client = ReloadPerCallClient(paths)

    async def go():
        await client.generate("m", PROMPTS[:1], GREEDY)
        first = client.last_model
        await client.score("m", PROMPTS[0], ["8"])
        return first

    first = asyncio.run(go())
    gc.collect()
    assert client.loads == 2  # one load per call: nothing is cached
    assert first() is None and client.last_model() is None  # both models are gone
    # The client holds no module anywhere in its state.
    assert not any(isinstance(v, torch.nn.Module) for v in vars(client).values())


def test_generate_with_and_fused_generate_load_per_call(paths, engine):
    client = ReloadPerCallClient(paths, groups={"twins": ["m", "m"], "duo": ["m", "n"]},
                                 scratch={"scratch": paths["n"]})

    async def go():
        want = (await engine.generate(PROMPTS[:1], GREEDY))[0]
        cand = (await client.generate_with("scratch", paths["m"], PROMPTS[:1], GREEDY))[0]
        # Fusing a model with itself is the model: its greedy decode must match.
        twin = (await client.fused_generate("twins", PROMPTS[:1], GREEDY, "fusion",
                                            [0.5, 0.5]))[0]
        duo = (await client.fused_generate("duo", PROMPTS[:1], GREEDY, "fusion", [1.0, 0.0]))[0]
        return want, cand, twin, duo

    loads0 = client.loads
    want, cand, twin, duo = asyncio.run(go())
    assert cand.token_ids == want.token_ids  # the weights dir the call named
    assert twin.text == want.text and twin.model == "twins"
    assert duo.text == want.text  # all the weight on m
    assert client.loads - loads0 == 1 + 2 + 2
    gc.collect()
    assert client.last_model() is None
    with pytest.raises(KeyError, match="unknown logit group"):
        asyncio.run(client.fused_generate("nope", PROMPTS[:1], GREEDY, "fusion", [1.0]))
    with pytest.raises(ValueError, match="unknown models"):
        ReloadPerCallClient(paths, groups={"g": ["m", "zz"]})
