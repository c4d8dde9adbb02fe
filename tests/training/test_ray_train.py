"""Real Ray Train + DeepSpeed runs (gloo on CPU, several workers per model)."""
from __future__ import annotations

import pytest
import torch
from distill_helpers import answer_nll, greedy_answers, teacher_topk
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moco_ray.config import DistillConfig
from moco_ray.models.checkpoint import verify_checkpoint
from moco_ray.training import DistillJob, distill_all
from moco_ray.training.data import tokenize_rows
from moco_ray.training.trainer import run_training


def test_zero2_lora_merged_memorises(ray_session, tiny_models, memo_rows, tmp_path):
    base = tiny_models["student"]
    # 2 workers x batch 2 = the 4 rows every step: the same global batch as one rank x batch 4.
    cfg = DistillConfig(method="lora", zero_stage=2, num_workers=2, batch_size=2, lr=2e-2,
                        max_steps=12, output="merged")
    info = distill_all([("student", base, memo_rows, str(tmp_path / "ckpt"))], cfg)["student"]
    assert info.steps == 12 and info.losses[-1] < 0.5 * info.losses[0]

    # DeepSpeed's rank averaging plus our global token normalisation: 2 ranks == 1 rank.
    from transformers import AutoTokenizer

    one = run_training(cfg.model_copy(update={"num_workers": 1, "batch_size": 4}), base,
                       tokenize_rows(memo_rows, AutoTokenizer.from_pretrained(base), 128))
    assert info.losses == pytest.approx(one.losses, rel=1e-3)

    manifest = verify_checkpoint(info.path)
    assert manifest["method"] == "lora" and manifest["output"] == "merged"
    # A plain model dir: full weights, no adapter files, loads with transformers.
    model = AutoModelForCausalLM.from_pretrained(info.path)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert answer_nll(info.path, memo_rows) < 0.5 * answer_nll(base, memo_rows)
    answers = [r["messages"][1]["content"] for r in memo_rows]
    before = greedy_answers(base, memo_rows)
    after = greedy_answers(info.path, memo_rows)
    hits = lambda outs: sum(o == a for o, a in zip(outs, answers))
    assert hits(after) >= 3 > hits(before)


def test_two_models_at_once_zero3_full_and_kd_adapter(ray_session, tiny_models, memo_rows,
                                                      tmp_path):
    import ray.data

    base = tiny_models["student"]
    # The Arrow-friendly [token_id, logprob] form of teacher_topk, as a Ray Dataset.
    kd_rows = [{**r, "teacher_topk": [sorted(d.items()) for d in r["teacher_topk"]]}
               for r in teacher_topk(tiny_models["teacher"], memo_rows)]
    shared = DistillConfig(max_steps=20, batch_size=2, num_workers=2)
    jobs = [
        DistillJob("full3", base, memo_rows, str(tmp_path / "full3"),
                   shared.model_copy(update={"method": "full", "zero_stage": 3, "lr": 1e-3})),
        DistillJob("kd", base, ray.data.from_items(kd_rows), str(tmp_path / "kd"),
                   shared.model_copy(update={"output": "adapter", "kd_weight": 1.0,
                                             "lr": 1e-2, "num_workers": 1})),
    ]
    infos = distill_all(jobs, DistillConfig())
    full3, kd = infos["full3"], infos["kd"]
    # Both runs were in their training loops at the same time (rank 0 clocks, one machine).
    assert max(full3.train_entered, kd.train_entered) < min(full3.train_finished,
                                                            kd.train_finished)
    for info in (full3, kd):
        assert info.steps == 20 and info.losses[-1] < info.losses[0]

    # ZeRO-3 sharded the weights; the checkpoint has them all, gathered, and trained.
    manifest = verify_checkpoint(full3.path)
    assert manifest["zero_stage"] == 3 and manifest["method"] == "full"
    saved = load_file(f"{full3.path}/model.safetensors")
    orig = load_file(f"{base}/model.safetensors")
    assert saved.keys() == orig.keys()
    assert all(saved[k].shape == orig[k].shape for k in orig)
    assert any(not torch.equal(saved[k], orig[k]) for k in orig)
    model = AutoModelForCausalLM.from_pretrained(full3.path)
    assert answer_nll(full3.path, memo_rows) < answer_nll(base, memo_rows)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in orig.values())

    assert verify_checkpoint(kd.path)["output"] == "adapter"
