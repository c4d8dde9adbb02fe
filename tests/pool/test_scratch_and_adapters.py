"""A scratch deployment serves whatever weights each call names (hot-swapped in, never a
restart), and a member with enable_lora serves a job's LoRA adapter dir per request."""
from __future__ import annotations

import asyncio

import pytest
from ports import free_port

from moco_ray import models
from moco_ray.config import ConfigError, ModelSpec, PoolConfig
from moco_ray.records import SamplingParams
from moco_ray.workflows.load import parse_config

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [[{"role": "user", "content": q}] for q in ("the cat sat on", "one two three",
                                                       "What is 7 plus 5?")]


def _spec(name: str, path: str, **kw) -> ModelSpec:
    return ModelSpec(name=name, path=path, engine="vllm", dtype="float32", max_model_len=256,
                     num_cpus=0.5, **kw)


@pytest.fixture(scope="module")
def spool(ray_session):
    from moco_ray.pool import ModelPool

    cfg = PoolConfig(name="scratchtest", http_port=free_port(), models=[
        _spec("a", "zoo:tiny", enable_lora=True), _spec("b", "zoo:tiny-s1"),
        _spec("scratch", "zoo:tiny", role="scratch")])
    p = ModelPool(cfg, seed=0)
    p.start(timeout_s=600)
    yield p
    p.shutdown()


def _texts(gens) -> list[str]:
    return [g.text for g in gens]


def test_scratch_is_not_a_member_and_serves_the_weights_each_call_names(spool):
    assert spool.models == ["a", "b"] and spool.scratch == ["scratch"]
    assert "scratch" not in spool.versions()  # the registry tracks members only
    client = spool.client()
    path_a, path_b = models.resolve_path("zoo:tiny"), models.resolve_path("zoo:tiny-s1")

    async def go():
        ref_a = await client.generate("a", PROMPTS, GREEDY)
        ref_b = await client.generate("b", PROMPTS, GREEDY)
        # In turn: b's weights in, then a's back (two swaps in place).
        v0 = (await client.info("scratch"))["version"]
        await client.generate_with("scratch", path_b, PROMPTS[:1], GREEDY)
        await client.generate_with("scratch", path_a, PROMPTS[:1], GREEDY)
        assert (await client.info("scratch"))["version"] == v0 + 2
        # Interleaved calls for two different weight sets: each gets its own weights' answers.
        calls = [client.generate_with("scratch", p, PROMPTS, GREEDY)
                 for p in (path_b, path_a, path_b, path_a, path_b)]
        outs = await asyncio.gather(*calls)
        return ref_a, ref_b, outs, await client.info("scratch")

    ref_a, ref_b, outs, info = asyncio.run(go())
    assert _texts(ref_a) != _texts(ref_b)  # the two weight sets really differ
    for out, want in zip(outs, (ref_b, ref_a, ref_b, ref_a, ref_b)):
        assert _texts(out) == _texts(want)
    assert info["version"] >= 3  # and at least once more for the interleaved calls


def test_generate_with_refuses_members_and_bad_weights(spool, tmp_path):
    from ray.serve.exceptions import RayServeException

    client = spool.client()
    with pytest.raises((ValueError, RayServeException), match="scratch deployments"):
        client.model_handle("a").generate_with.remote(
            models.resolve_path("zoo:tiny"), PROMPTS, GREEDY).result()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Exception, match="safetensors"):
        asyncio.run(client.generate_with("scratch", str(tmp_path), PROMPTS, GREEDY))
    # The scratch still serves after the refusal.
    out = asyncio.run(client.generate_with("scratch", models.resolve_path("zoo:tiny"), PROMPTS[:1],
                                           GREEDY))
    assert out[0].text


def test_an_adapter_dir_is_served_per_request(spool, tmp_path):
    from moco_ray.config import DistillConfig
    from moco_ray.training import distill_local

    rows = [{"messages": [{"role": "user", "content": "What is 7 plus 5?"},
                          {"role": "assistant", "content": "twelve twelve"}]}] * 8
    cfg = DistillConfig(method="lora", output="adapter", lr=1e-2, max_steps=40, batch_size=4,
                        zero_stage=0, lora_r=8)
    info = distill_local("a", models.resolve_path("zoo:tiny"), rows, str(tmp_path / "ad"), cfg)
    client = spool.client()
    prompt = [PROMPTS[2]]

    async def go():
        base = await client.generate("a", prompt, GREEDY)
        tuned = await client.generate("a", prompt, GREEDY, info.path)
        base_again = await client.generate("a", prompt, GREEDY)
        s_base = await client.score("a", prompt[0], ["twelve twelve"])
        s_tuned = await client.score("a", prompt[0], ["twelve twelve"], lora=info.path)
        return base, tuned, base_again, s_base, s_tuned

    base, tuned, base_again, s_base, s_tuned = asyncio.run(go())
    # The same adapter applied by peft in transformers decodes the same greedy tokens.
    assert tuned[0].token_ids == _peft_greedy(models.resolve_path("zoo:tiny"), info.path,
                                              prompt[0], GREEDY.max_tokens)
    assert base[0].text == base_again[0].text != tuned[0].text  # the member is unchanged
    assert s_tuned[0].mean_logprob > s_base[0].mean_logprob + 1.0
    with pytest.raises(Exception, match="enable_lora"):
        asyncio.run(client.generate("b", prompt, GREEDY, info.path))


def _peft_greedy(base_dir: str, adapter: str, prompt, max_tokens: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moco_ray.models.tokenizer import encode_prompt

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([encode_prompt(tok, prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new


def test_config_checks_scratch_references():
    base = {"pool": {"models": [{"name": "a", "path": "zoo:tiny"},
                                {"name": "s", "path": "zoo:tiny", "role": "scratch"}],
                     "logit_groups": [{"name": "g", "models": ["a", "s"]}]},
            "tasks": [{"name": "arith", "source": "synthetic"}],
            "jobs": [{"strategy": "single", "scratch": "a"}]}
    with pytest.raises(ConfigError) as e:
        parse_config(base)
    msg = str(e.value)
    assert "pool.logit_groups.0.models" in msg and "jobs.0.scratch" in msg
