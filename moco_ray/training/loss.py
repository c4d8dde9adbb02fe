"""The distillation loss: SFT cross-entropy on reply tokens + kd_weight * top-k logit KD.

Both terms come back as sums with their counts, so the training loop can divide by the token
count of the whole optimizer step (all micro-batches, all workers). That makes the loss, and the
gradient, independent of how a step is cut into micro-batches and workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moco_ray.training.data import IGNORE


def sft_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count."""
    logits, target = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def topk_kl(student_logits: torch.Tensor, kd_ids: torch.Tensor, kd_lp: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Per position KL(teacher || student) over the teacher's top-k ids, both renormalised over
    those ids at `temperature`, times T^2 (Hinton et al.: keeps gradient size independent of T).

    student_logits [N, V]; kd_ids [N, K] token ids; kd_lp [N, K] teacher logprobs, -inf = padding.
    Restricting the student to the same k ids makes the term zero exactly when the student ranks
    those ids like the teacher, whatever mass either puts elsewhere.
    """
    pad = torch.isinf(kd_lp)
    teacher = F.log_softmax(kd_lp / temperature, dim=-1)
    student = student_logits.float().gather(-1, kd_ids) / temperature
    student = F.log_softmax(student.masked_fill(pad, float("-inf")), dim=-1)
    diff = (teacher - student).masked_fill(pad, 0.0)  # pads: 0 * (-inf - -inf) would be nan
    return (teacher.exp() * diff).sum(-1) * temperature**2


def kd_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor],
           temperature: float) -> tuple[torch.Tensor, int]:
    """Summed top-k KL over the batch's teacher positions, and their count. The distribution
    for the token at position t comes from the logits at t - 1."""
    n = int(batch["kd_pos"].numel())
    if n == 0:
        return logits.new_zeros(()), 0
    rows = logits[batch["kd_row"], batch["kd_pos"] - 1]
    return topk_kl(rows, batch["kd_ids"], batch["kd_lp"], temperature).sum(), n
