"""HFEngine specifics: micro-batching, weight swaps, input errors."""
from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moco_ray.config import EngineSpec
from moco_ray.engines.hf import HFEngine
from moco_ray.engines.registry import build_engine
from moco_ray.records import SamplingParams

GREEDY = SamplingParams(max_tokens=8)


async def _gather(*coros):
    # gather inside a coroutine, so its futures belong to the session loop
    return await asyncio.gather(*coros)


def _engine(path: str, **kw) -> HFEngine:
    return HFEngine(EngineSpec(model=path, kind="hf", dtype="float32", max_model_len=512, **kw))


def test_concurrent_calls_share_forward_passes(hf_engine, run):
    before = dict(hf_engine.stats)
    prompts = [f"{i}+{i}=" for i in range(8)]
    run(_gather(*(hf_engine.generate([p], GREEDY) for p in prompts)))
    batches = hf_engine.stats["batches"] - before["batches"]
    assert hf_engine.stats["requests"] - before["requests"] == 8
    assert batches < 8, f"8 concurrent calls ran in {batches} batches: no micro-batching"


def test_max_batch_size_splits_rows(tiny, run):
    eng = _engine(tiny, engine_kwargs={"max_batch_size": 2})
    many = run(eng.generate([f"{i}*3=" for i in range(5)], GREEDY))
    one = [run(eng.generate([f"{i}*3="], GREEDY))[0] for i in range(5)]
    assert [g.token_ids for g in many] == [g.token_ids for g in one]


def test_load_weights_swaps_in_place(tiny, tiny_s1, tmp_path, run):
    eng = _engine(tiny)
    before = run(eng.generate(["12+7="], GREEDY))[0]
    assert run(eng.load_weights(tiny_s1)) == 1 and eng.version == 1
    after = run(eng.generate(["12+7="], GREEDY))[0]
    assert after.version == 1
    assert after.token_ids != before.token_ids
    assert after.token_ids == run(_engine(tiny_s1).generate(["12+7="], GREEDY))[0].token_ids

    # A checkpoint with one tensor of the wrong shape is refused whole; the old weights serve on.
    bad = tmp_path / "bad"
    shutil.copytree(tiny_s1, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape \[65\]"):
        run(eng.load_weights(str(bad)))
    assert eng.version == 1
    assert run(eng.generate(["12+7="], GREEDY))[0].token_ids == after.token_ids

    # A missing tensor and a file that is not safetensors are refused too.
    del tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.norm\.weight'"):
        run(eng.load_weights(str(bad)))
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not valid safetensors"):
        run(eng.load_weights(str(bad)))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        run(eng.load_weights(str(tmp_path)))
    assert eng.version == 1


def test_bad_input_is_named(tiny, hf_engine, run):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        run(hf_engine.generate(["x"], GREEDY, lora="a"))
    with pytest.raises(ValueError, match="does not fit max_model_len"):
        run(hf_engine.generate(["1" * 600], GREEDY))
    with pytest.raises(ValueError, match="unknown engine_kwargs.*'bogus'"):
        _engine(tiny, engine_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="unknown engine kind 'tpu'"):
        build_engine(EngineSpec(model=tiny, kind="tpu"))


def test_build_engine_makes_hf(tiny):
    assert isinstance(build_engine(EngineSpec(model=tiny, kind="hf")), HFEngine)


async def _swap_while_generating(eng, path, params):
    in_flight = asyncio.ensure_future(eng.generate(["12+7="], params))
    await asyncio.sleep(0.05)
    assert not in_flight.done(), "the request must still be running when the swap begins"
    version = await eng.load_weights(path)
    return (await in_flight)[0], version


def test_swap_waits_for_the_running_batch(tiny, tiny_s1, run):
    eng = _engine(tiny)
    long = SamplingParams(max_tokens=200)
    reference = run(eng.generate(["12+7="], long))[0]
    gen, version = run(_swap_while_generating(eng, tiny_s1, long))
    assert version == 1
    assert gen.token_ids == reference.token_ids and gen.version == 0
    assert run(eng.generate(["12+7="], long))[0].version == 1
