"""LockstepDecoder on tiny random Llama models (moco_ray.models.zoo) that share one local BPE tokenizer.

The references are independent of the decoder: transformers' own `generate`, and a naive loop
that re-runs every model over each prompt alone, without padding or cache, every step.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from moco_ray.engines.lockstep import LockstepDecoder, get_combine
from moco_ray.models import zoo

PROMPTS = ["the quick brown fox", "question: what is 3 plus 4? answer:", "dog"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return zoo.make_tokenizer(tmp_path_factory.mktemp("tok"), zoo.tiny_corpus(), vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def tiny_llama(tmp_path_factory, tok_dir, seed: int) -> LlamaForCausalLM:
    path = zoo.make_tiny_llama(tmp_path_factory.mktemp(f"m{seed}"), tok_dir, seed=seed,
                               hidden_size=64, num_layers=2, num_heads=2)
    return LlamaForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok_dir):
    return [tiny_llama(tmp_path_factory, tok_dir, 0), tiny_llama(tmp_path_factory, tok_dir, 1)]


def naive(models, tokenizer, prompt, weights, steps, combine="fusion"):
    """Full recompute each step, one prompt alone: tokens and combined logprobs."""
    seq = tokenizer.encode(prompt)
    w = torch.tensor(weights)
    toks, lps = [], []
    with torch.no_grad():
        for _ in range(steps):
            logps = torch.stack([F.log_softmax(m(torch.tensor([seq])).logits[0, -1].float(), -1)
                                 for m in models])
            if combine == "fusion":
                scores = (w[:, None] * logps).sum(0) / w.sum()
            else:
                scores = (w[:, None] * logps).sum(0)
            t = int(scores.argmax())
            toks.append(t)
            lps.append(float(F.log_softmax(scores, -1)[t]))
            seq.append(t)
    return toks, lps


def test_padded_batch_equals_each_prompt_alone(pair, tokenizer):
    dec = LockstepDecoder(pair, tokenizer)
    batch = dec.generate(PROMPTS, max_tokens=12)
    lens = {len(tokenizer.encode(p)) for p in PROMPTS}
    assert len(lens) == len(PROMPTS), "prompts must differ in length to exercise padding"
    for prompt, got in zip(PROMPTS, batch):
        [alone] = dec.generate([prompt], max_tokens=12)
        assert got["token_ids"] == alone["token_ids"]
        assert got["text"] == alone["text"]
        assert got["prompt_tokens"] == len(tokenizer.encode(prompt))
        for a, b in zip(got["logprobs"], alone["logprobs"]):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_one_model_weight_one_equals_its_own_greedy_generate(pair, tokenizer):
    model = pair[0]
    dec = LockstepDecoder([model], tokenizer)
    for prompt in PROMPTS:
        [got] = dec.generate([prompt], max_tokens=15, weights=[1.0])
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15,
                                 do_sample=False, pad_token_id=0)
        ref_new = ref[0, ids.shape[1]:].tolist()
        assert got["token_ids"] == ref_new[:len(got["token_ids"])]
        assert got["completion_tokens"] == len(got["token_ids"]) > 0


@pytest.mark.parametrize("combine,weights", [("fusion", [0.3, 0.7]), ("contrastive", [1.0, -0.5])])
def test_combination_equals_naive_full_recompute(pair, tokenizer, combine, weights):
    dec = LockstepDecoder(pair, tokenizer)
    out = dec.generate(PROMPTS, max_tokens=10, combine=combine, weights=weights)
    for prompt, got in zip(PROMPTS, out):
        toks, lps = naive(pair, tokenizer, prompt, weights, 10, combine)
        assert got["token_ids"] == toks
        assert [e["logprob"] for e in got["logprobs"]] == pytest.approx(lps, abs=1e-4)
        assert got["finish_reason"] == "length"
    # the fusion differs from either model alone, so the test above can fail
    solo = LockstepDecoder(pair[:1], tokenizer).generate(PROMPTS, max_tokens=10)
    assert [o["token_ids"] for o in out] != [s["token_ids"] for s in solo]


def test_kv_cache_feeds_one_new_token_per_step(pair, tokenizer):
    dec = LockstepDecoder(pair, tokenizer)
    seen: list[list[int]] = [[], []]
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kw, i=i: seen[i].append(kw["input_ids"].shape[1]), with_kwargs=True)
        for i, m in enumerate(pair)]
    try:
        dec.generate(PROMPTS, max_tokens=8)
    finally:
        for h in hooks:
            h.remove()
    longest = max(len(tokenizer.encode(p)) for p in PROMPTS)
    for calls in seen:  # prefill of the padded prompt, then one token per decode step
        assert calls == [longest] + [1] * 7
    assert dec.last_cache_lengths == [longest + 7, longest + 7]


def test_eos_and_stop_strings_end_rows_independently(pair, tokenizer):
    dec = LockstepDecoder(pair, tokenizer)
    [free] = dec.generate([PROMPTS[0]], max_tokens=12)
    eos = free["token_ids"][4]
    first = free["token_ids"].index(eos)
    models = copy.deepcopy(pair)
    for m in models:
        m.generation_config.eos_token_id = eos
    out = LockstepDecoder(models, tokenizer).generate(PROMPTS, max_tokens=12)
    assert out[0]["finish_reason"] == "stop"
    assert out[0]["token_ids"] == free["token_ids"][:first + 1]
    assert out[0]["text"] == tokenizer.decode(free["token_ids"][:first], skip_special_tokens=True)
    assert all(len(o["token_ids"]) <= 12 for o in out)

    stop = free["text"][5:8]
    [cut] = dec.generate([PROMPTS[0]], max_tokens=12, stop=[stop])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == free["text"][:free["text"].find(stop)]
    assert len(cut["token_ids"]) < 12


def test_sampling_is_seeded_and_nucleus_of_one_is_greedy(pair, tokenizer):
    dec = LockstepDecoder(pair, tokenizer)
    greedy = dec.generate(PROMPTS, max_tokens=10)
    a = dec.generate(PROMPTS, max_tokens=10, temperature=1.5, seed=7)
    b = dec.generate(PROMPTS, max_tokens=10, temperature=1.5, seed=7)
    assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b]
    assert [x["token_ids"] for x in a] != [x["token_ids"] for x in greedy]
    tight = dec.generate(PROMPTS, max_tokens=10, temperature=1.5, top_p=1e-6, seed=3)
    assert [x["token_ids"] for x in tight] == [x["token_ids"] for x in greedy]
    [top] = dec.generate(PROMPTS[:1], max_tokens=3, top_logprobs=4)
    for e in top["logprobs"]:
        assert len(e["top"]) == 4 and max(e["top"].values()) == pytest.approx(e["logprob"])


def test_bad_inputs_raise_clear_errors(pair, tokenizer, tmp_path_factory):
    other_tok = zoo.make_tokenizer(tmp_path_factory.mktemp("tok2"), zoo.tiny_corpus(), 360)
    other = tiny_llama(tmp_path_factory, other_tok, 2)
    with pytest.raises(ValueError, match=r"vocab sizes are \[320, 360\]"):
        LockstepDecoder([pair[0], other], tokenizer)
    dec = LockstepDecoder(pair, tokenizer)
    with pytest.raises(ValueError, match="2 models"):
        dec.generate(PROMPTS, max_tokens=4, weights=[1.0])
    with pytest.raises(ValueError, match="fusion weights"):
        dec.generate(PROMPTS, max_tokens=4, weights=[1.0, -1.0])
    with pytest.raises(KeyError, match="valid: contrastive, fusion"):
        get_combine("nope")
    with pytest.raises(ValueError, match="exceeds the models' context"):
        dec.generate(PROMPTS, max_tokens=3000)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_members_on_different_gpus_match_the_cpu(pair, tokenizer):
    """A logit group's members on cuda:0 and cuda:1, log-probs gathered on cuda:0: the same
    greedy fused tokens as on the CPU."""
    on_cpu = LockstepDecoder(pair, tokenizer).generate(PROMPTS, max_tokens=8,
                                                       weights=[0.3, 0.7])
    spread = [copy.deepcopy(m).to(f"cuda:{i}") for i, m in enumerate(pair)]
    dec = LockstepDecoder(spread, tokenizer, device="cuda:0")
    got = dec.generate(PROMPTS, max_tokens=8, weights=[0.3, 0.7])
    assert [g["token_ids"] for g in got] == [g["token_ids"] for g in on_cpu]
    for a, b in zip(got, on_cpu):
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-3)
