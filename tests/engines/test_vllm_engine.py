"""VLLMEngine specifics: weight swaps through reload_weights, LoRA adapters, engine args."""
from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moco_ray.config import EngineSpec
from moco_ray.engines.hf import HFEngine
from moco_ray.engines.vllm import VLLMEngine
from moco_ray.records import SamplingParams

GREEDY = SamplingParams(max_tokens=8)
PROMPTS = ["12+7=", "the answer is"]


def _hf(path: str) -> HFEngine:
    return HFEngine(EngineSpec(model=path, kind="hf", dtype="float32", max_model_len=512))


def _ids(gens):
    return [g.token_ids for g in gens]


def test_load_weights_swaps_in_place(vllm_engine, tiny, tiny_s1, tmp_path, run):
    eng = vllm_engine
    v0 = eng.version
    before = run(eng.generate(PROMPTS, GREEDY))
    try:
        assert run(eng.load_weights(tiny_s1)) == v0 + 1
        after = run(eng.generate(PROMPTS, GREEDY))
        assert all(g.version == v0 + 1 for g in after)
        assert _ids(after) != _ids(before)
        # The swapped-in weights decode exactly like a fresh engine on them (HF, same ids).
        assert _ids(after) == _ids(run(_hf(tiny_s1).generate(PROMPTS, GREEDY)))

        bad = tmp_path / "bad"
        shutil.copytree(tiny_s1, bad)
        tensors = {k: v.clone() for k, v in load_file(str(bad / "model.safetensors")).items()}
        tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
            run(eng.load_weights(str(bad)))
        assert eng.version == v0 + 1
        assert _ids(run(eng.generate(PROMPTS, GREEDY))) == _ids(after)
    finally:
        run(eng.load_weights(tiny))  # the other tests share this engine
    assert _ids(run(eng.generate(PROMPTS, GREEDY))) == _ids(before)


async def _swap_while_generating(eng, path, params):
    in_flight = asyncio.ensure_future(eng.generate(["12+7="], params))
    await asyncio.sleep(0.05)
    assert not in_flight.done(), "the request must still be running when the swap begins"
    version = await eng.load_weights(path)
    return (await in_flight)[0], version


def test_swap_lets_in_flight_requests_finish_on_old_weights(vllm_engine, tiny, tiny_s1, run):
    eng = vllm_engine
    long = SamplingParams(max_tokens=120)
    reference = run(eng.generate(["12+7="], long))[0]
    v0 = eng.version
    try:
        gen, version = run(_swap_while_generating(eng, tiny_s1, long))
        assert version == v0 + 1
        assert gen.finish_reason != "abort"
        assert gen.token_ids == reference.token_ids and gen.version == v0
        assert run(eng.generate(["12+7="], long))[0].token_ids != reference.token_ids
    finally:
        run(eng.load_weights(tiny))


def test_lora_adapter_matches_merged_weights(vllm_lora_engine, tiny, tmp_path, run):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    # init_lora_weights=False: random A and B, so the adapter really changes the outputs.
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)  # keep the delta moderate
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(str(merged))
    AutoTokenizer.from_pretrained(tiny).save_pretrained(str(merged))

    eng = vllm_lora_engine
    run(eng.add_lora("probe", str(adapter)))
    with_lora = run(eng.generate(PROMPTS, GREEDY, lora="probe"))
    without = run(eng.generate(PROMPTS, GREEDY))
    assert _ids(with_lora) != _ids(without)
    assert _ids(with_lora) == _ids(run(_hf(str(merged)).generate(PROMPTS, GREEDY)))
    assert _ids(without) == _ids(run(_hf(tiny).generate(PROMPTS, GREEDY)))

    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'.*'probe'"):
        run(eng.generate(PROMPTS, GREEDY, lora="nope"))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        run(eng.add_lora("x", str(tmp_path)))


def test_scoring_with_lora_enabled_matches_hf(vllm_lora_engine, hf_engine, run):
    # A LoRA-enabled engine scores token by token (prompt_logprobs would kill it); the numbers
    # are the same as HF's (measured max diff 2e-6).
    conts = ["19", " 20 apples", "yes"]
    lora = run(vllm_lora_engine.score("12+7=", conts))
    hf = run(hf_engine.score("12+7=", conts))
    for a, b in zip(lora, hf):
        assert a.num_tokens == b.num_tokens
        assert a.sum_logprob == pytest.approx(b.sum_logprob, abs=1e-3)


def test_stepwise_scoring_equals_prompt_logprobs(vllm_engine, run):
    from moco_ray.models.tokenizer import encode_continuation, encode_prompt

    p = encode_prompt(vllm_engine.tokenizer, "the answer is")
    seqs = [p + encode_continuation(vllm_engine.tokenizer, c) for c in ["19", " yes it is"]]
    stepwise = run(vllm_engine.score_stepwise(len(p), seqs))
    direct = run(vllm_engine.score("the answer is", ["19", " yes it is"]))
    for a, b in zip(stepwise, direct):
        assert a.num_tokens == b.num_tokens
        assert a.sum_logprob == pytest.approx(b.sum_logprob, abs=1e-4)


def test_health_check(vllm_engine, tiny, run):
    run(vllm_engine.check_health())  # a live engine core: no exception
    run(VLLMEngine(EngineSpec(model=tiny)).check_health())  # not started yet: nothing to check


def test_engine_args_and_errors(tiny, run):
    eng = VLLMEngine(EngineSpec(model=tiny, dtype="float32", max_model_len=256,
                                engine_kwargs={"max_num_seqs": 4}))
    args = eng.engine_args()
    assert (args.model, args.dtype, args.max_model_len, args.max_num_seqs) == (
        tiny, "float32", 256, 4)
    assert args.enforce_eager is (not torch.cuda.is_available())
    with pytest.raises(ValueError, match="unknown engine_kwargs for vLLM: \\['bogus'\\]"):
        VLLMEngine(EngineSpec(model=tiny, engine_kwargs={"bogus": 1}))
    with pytest.raises(ValueError, match="without enable_lora"):
        run(eng.add_lora("a", tiny))


def test_gpu_placement_settings_reach_vllm_engine_args(tiny, monkeypatch):
    """The pool's placement settings (ModelSpec -> EngineSpec) become vLLM's engine args; the
    GPU-only ones are checked with the GPU branch taken (engine_args builds nothing)."""
    import moco_ray.engines.vllm as vllm_mod
    from moco_ray.config import ModelSpec

    m = ModelSpec(name="m", path=tiny, num_gpus=1, tensor_parallel_size=2,
                  pipeline_parallel_size=2, gpu_memory_utilization=0.6, enable_lora=True,
                  max_loras=3)
    monkeypatch.setattr(vllm_mod, "_on_gpu", lambda: True)
    args = VLLMEngine(m.engine_spec(tiny)).engine_args()
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.gpu_memory_utilization,
            args.max_loras, args.distributed_executor_backend) == (2, 2, 0.6, 3, "ray")
    one = VLLMEngine(ModelSpec(name="m", path=tiny, num_gpus=1).engine_spec(tiny)).engine_args()
    assert (one.tensor_parallel_size, one.gpu_memory_utilization) == (1, 0.85)
    assert one.distributed_executor_backend is None  # vLLM's own default for one GPU


def test_many_seeded_long_prompts_at_once_keep_the_engine_alive(vllm_engine, run):
    """Regression: seeded sampling on a prompt that vLLM splits over steps (chunked prefill)
    rewinds a CPU torch.Generator, which kills the engine core; the CPU engine args avoid it."""
    long = "word " * 100
    params = [SamplingParams(max_tokens=4, temperature=0.7, seed=i) for i in range(24)]

    async def burst():
        return await asyncio.gather(*[vllm_engine.generate([long + str(i)], p)
                                      for i, p in enumerate(params)])

    outs = run(burst())
    assert len(outs) == 24 and all(o[0].completion_tokens >= 1 for o in outs)
    args = vllm_engine.engine_args()
    assert args.enable_chunked_prefill is False and args.max_num_batched_tokens >= 2048
