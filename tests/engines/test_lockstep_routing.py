"""The 'route' combine of the lockstep decoder (token-level routing, logit_fusion_route) on tiny
random Llamas that share one local tokenizer.

The reference is a naive loop, independent of the decoder: each prompt alone, every model re-run
over the whole sequence each step, the router's features and choice computed by hand.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from moco_ray.engines.lockstep import LockstepDecoder, get_combine, route_features
from moco_ray.models import zoo
from moco_ray.records import TokenLogprobs
from moco_ray.strategies.logit.fusion_route import step_features

PROMPTS = ["the quick brown fox", "question: what is 3 plus 4? answer:", "dog",
           "one two three four five six"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return zoo.make_tokenizer(tmp_path_factory.mktemp("tok"), zoo.tiny_corpus(), vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tokenizer_dir):
    out = []
    for seed in (0, 1, 2):
        path = zoo.make_tiny_llama(tmp_path_factory.mktemp(f"m{seed}"), tokenizer_dir, seed=seed,
                                   hidden_size=64, num_layers=2, num_heads=2)
        out.append(LlamaForCausalLM.from_pretrained(str(path)).eval())
    return out


def mode(**params) -> str:
    return "route:" + json.dumps(params)


def naive_route(models, tokenizer, prompt, steps, coef, biases, top_k=20, complement=0.0):
    """Tokens, combined logprobs and the expert of every step, all by hand."""
    seq = tokenizer.encode(prompt)
    toks, lps, experts = [], [], []
    with torch.no_grad():
        for _ in range(steps):
            logps = [F.log_softmax(m(torch.tensor([seq])).logits[0, -1].float(), -1)
                     for m in models]
            scores = []
            for lp, b in zip(logps, biases):
                top = lp.topk(top_k).values
                q = top - torch.logsumexp(top, 0)
                entropy = float(-(q.exp() * q).sum())
                scores.append(coef[0] * math.exp(float(top[0])) + coef[1] * entropy + b)
            e = max(range(len(models)), key=lambda i: (scores[i], -i))
            mixed = logps[e] + complement * torch.stack(logps).mean(0)
            t = int(mixed.argmax())
            toks.append(t)
            lps.append(float(F.log_softmax(mixed, -1)[t]))
            experts.append(e)
            seq.append(t)
    return toks, lps, experts


@pytest.mark.parametrize("coef,complement", [([1.0, 0.0], 0.0), ([0.5, -1.0], 0.0),
                                             ([1.0, 0.0], 0.7)])
def test_route_equals_a_hand_made_router(trio, tokenizer, coef, complement):
    biases = [0.0, 0.002, -0.002]  # tiny random models: top-1 probabilities are ~0.02-0.04
    dec = LockstepDecoder(trio, tokenizer)
    out = dec.generate(PROMPTS, max_tokens=10, combine=mode(coef=coef, complement=complement),
                       weights=biases)
    used = set()
    for prompt, got in zip(PROMPTS, out):
        toks, lps, experts = naive_route(trio, tokenizer, prompt, 10, coef, biases,
                                         complement=complement)
        assert got["token_ids"] == toks
        assert [e["logprob"] for e in got["logprobs"]] == pytest.approx(lps, abs=1e-4)
        used.update(experts)
    # the router switched experts: always following one model would not pass
    assert len(used) >= 2


def test_a_dominant_bias_decodes_as_that_model_alone(trio, tokenizer):
    routed = LockstepDecoder(trio, tokenizer).generate(
        PROMPTS, max_tokens=10, combine="route", weights=[0.0, 100.0, 0.0])
    alone = LockstepDecoder(trio[1:2], tokenizer).generate(PROMPTS, max_tokens=10)
    assert [r["token_ids"] for r in routed] == [a["token_ids"] for a in alone]
    fused = LockstepDecoder(trio, tokenizer).generate(PROMPTS, max_tokens=10)
    assert [r["token_ids"] for r in routed] != [f["token_ids"] for f in fused]


def test_decoder_features_match_what_the_strategy_learns_from(tokenizer):
    # The router is fit on engine-reported top-k logprobs (step_features) and applied to full
    # log-probs in the decoder (route_features): the same numbers, or the router is off.
    torch.manual_seed(0)
    logps = F.log_softmax(torch.randn(3, 4, 50) * 3, dim=-1)
    for k in (1, 5, 20):
        feats = route_features(logps, k)
        for m in range(3):
            for b in range(4):
                vals, ids = logps[m, b].topk(k)
                t = TokenLogprobs(token_id=int(ids[0]), logprob=float(vals[0]),
                                  top=dict(zip(ids.tolist(), vals.tolist())))
                assert step_features(t, k) == pytest.approx(feats[m, b].tolist(), abs=1e-5)


def test_bad_route_parameters_raise_clear_errors():
    logps = F.log_softmax(torch.randn(2, 1, 8), dim=-1)
    with pytest.raises(ValueError, match=r"\['bogus'\] are unknown"):
        get_combine(mode(bogus=1))
    with pytest.raises(ValueError, match="one per feature"):
        get_combine(mode(coef=[1.0]))
    with pytest.raises(ValueError, match="must be a JSON object"):
        get_combine("route:{not json")
    with pytest.raises(ValueError, match="complement >= 0"):
        get_combine(mode(complement=-1))
    with pytest.raises(KeyError, match="valid: contrastive, fusion, route"):
        get_combine("routing")
    # default parameters: follow the most confident model
    logps[1, 0] = F.log_softmax(torch.tensor([9.0] + [0.0] * 7), dim=-1)
    out = get_combine("route")(logps, torch.zeros(2))
    assert torch.equal(out, logps[1])
