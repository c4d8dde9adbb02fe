"""The loss terms as pure functions: SFT sums over labelled tokens, top-k KD against a teacher."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moco_ray.training.loss import kd_sum, sft_sum, topk_kl


def test_kd_is_zero_when_student_matches_teacher_on_the_topk():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    ids = torch.stack([torch.randperm(40)[:4] for _ in range(5)])
    # The teacher's logprobs are the student's own (full-vocab normalised): after renormalising
    # over the same k ids both distributions agree, at any temperature.
    lp = F.log_softmax(logits, -1).gather(-1, ids)
    for t in (0.5, 1.0, 2.0):
        assert topk_kl(logits, ids, lp, t).abs().max() < 1e-6
    # Extra mass elsewhere in the student's vocabulary does not count (restricted to the k ids).
    shifted = logits.clone()
    shifted[:, 0] += 5.0
    keep = (ids != 0).all(-1)
    assert topk_kl(shifted, ids, lp, 1.0)[keep].abs().max() < 1e-6


def test_kd_is_positive_when_they_differ_and_matches_a_direct_kl():
    torch.manual_seed(1)
    logits = torch.randn(3, 30)
    ids = torch.stack([torch.randperm(30)[:5] for _ in range(3)])
    lp = torch.randn(3, 5).log_softmax(-1) - 0.3  # top-k mass below 1, as a real top-k has
    t = 2.0
    got = topk_kl(logits, ids, lp, t)
    assert (got > 0).all()
    p = F.softmax(lp / t, -1)
    q = F.log_softmax(logits.gather(-1, ids) / t, -1)
    want = (p * (p.log() - q)).sum(-1) * t * t
    assert torch.allclose(got, want, atol=1e-6)


def test_kd_padding_carries_no_weight():
    torch.manual_seed(2)
    logits = torch.randn(1, 20)
    ids = torch.tensor([[3, 7, 0]])
    lp = torch.tensor([[-0.3, -1.5, -math.inf]])
    full = topk_kl(logits, ids, lp, 1.0)
    short = topk_kl(logits, ids[:, :2], lp[:, :2], 1.0)
    assert torch.isfinite(full).all() and torch.allclose(full, short)


def test_sft_sum_counts_only_labelled_next_tokens():
    logits = torch.zeros(1, 4, 10)  # uniform: every token costs log(10)
    labels = torch.tensor([[-100, -100, 4, 5]])
    total, n = sft_sum(logits, labels)
    assert n == 2 and math.isclose(float(total), 2 * math.log(10), rel_tol=1e-6)


def test_kd_sum_reads_the_logits_one_position_back():
    logits = torch.full((1, 3, 6), -10.0)
    logits[0, 1, 2] = 10.0  # the prediction made at position 1 is for the token at position 2
    batch = {"kd_row": torch.tensor([0]), "kd_pos": torch.tensor([2]),
             "kd_ids": torch.tensor([[2, 3]]), "kd_lp": torch.tensor([[0.0, -30.0]])}
    total, n = kd_sum(logits, batch, 1.0)
    assert n == 1 and float(total) < 1e-6
    batch["kd_pos"] = torch.tensor([1])  # one position early: the teacher disagrees
    assert float(kd_sum(logits, batch, 1.0)[0]) > 0.5  # uniform vs one-hot: log 2
