"""The training loop in this process on one rank (real DeepSpeed on a one-rank gloo group):
pinned losses, the batch/accumulation invariant, and the checkpoint a local run writes."""
from __future__ import annotations

import pytest
import torch
from distill_helpers import FACTS, chat, teacher_topk
from transformers import AutoModelForCausalLM, AutoTokenizer

from moco_ray.config import DistillConfig
from moco_ray.models.checkpoint import MANIFEST, CheckpointError, verify_checkpoint
from moco_ray.training import distill_local
from moco_ray.training.data import tokenize_rows
from moco_ray.training.trainer import run_training

# Computed once with this setup (student seed 0, teacher seed 1, rows 0-1 with teacher top-5,
# lr 1e-2 LoRA / 1e-3 full, batch 2, kd_weight 0.5 at T=2); they move only if the loss, the data
# order, the adapter init or the tiny models change.
PINNED = {"lora": [6.606652608284583, 5.974097824096679, 5.119923325379689, 4.800055807763404],
          "full": [6.606652608284583, 6.070036315917969, 5.264357340335846, 4.757577727129171]}


@pytest.fixture(scope="module")
def kd_rows(tiny_models, memo_rows):
    return teacher_topk(tiny_models["teacher"], memo_rows[:2]) + memo_rows[2:]


def _tokenized(model_dir, rows):
    return tokenize_rows(rows, AutoTokenizer.from_pretrained(model_dir), 128)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_pinned_losses(tiny_models, kd_rows, method):
    cfg = DistillConfig(method=method, zero_stage=0, lr=1e-2 if method == "lora" else 1e-3,
                        batch_size=2, max_steps=4, kd_weight=0.5, kd_temperature=2.0)
    state = run_training(cfg, tiny_models["student"], _tokenized(tiny_models["student"], kd_rows))
    assert state.losses == pytest.approx(PINNED[method], abs=1e-4)


def test_kd_term_changes_the_loss(tiny_models, kd_rows):
    rows = _tokenized(tiny_models["student"], kd_rows)
    losses = {w: run_training(DistillConfig(zero_stage=0, batch_size=4, max_steps=1, kd_weight=w),
                              tiny_models["student"], rows).losses[0] for w in (0.0, 1.0)}
    assert losses[1.0] > losses[0.0] + 0.01  # teacher and student are different random models


def test_batch_4x1_gives_the_same_curve_as_2x2(tiny_models, kd_rows):
    # 8 rows of unequal length: the invariant needs the token-level normalisation over the step.
    rows = _tokenized(tiny_models["student"],
                      kd_rows + [chat(q + " Answer briefly please.", a + " indeed") for q, a in FACTS])
    curves = []
    for batch, accum in [(4, 1), (2, 2)]:
        cfg = DistillConfig(zero_stage=2, lr=1e-2, batch_size=batch, grad_accum=accum,
                            max_steps=4, kd_weight=0.5)
        curves.append(run_training(cfg, tiny_models["student"], rows).losses)
    assert len(curves[0]) == 4 and curves[0][-1] < curves[0][0]
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)


def test_local_adapter_checkpoint_loads_and_is_verified(tiny_models, memo_rows, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    cfg = DistillConfig(method="lora", output="adapter", zero_stage=0, lr=1e-2, batch_size=2,
                        max_steps=2)
    info = distill_local("student", tiny_models["student"], memo_rows, str(out), cfg)
    assert info.steps == 2 and info.final_loss == info.losses[-1]
    manifest = verify_checkpoint(out)
    assert set(manifest["files"]) == {"adapter_model.safetensors"}
    assert manifest["method"] == "lora" and manifest["base_model"] == tiny_models["student"]

    base = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    before = base(ids).logits.detach()
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    assert not torch.allclose(tuned(ids).logits, before)  # the adapter carries the training

    weights = out / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(out)
    (out / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=MANIFEST):
        verify_checkpoint(out)


def test_local_refuses_a_non_empty_out_dir(tiny_models, memo_rows, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        distill_local("student", tiny_models["student"], memo_rows, str(tmp_path),
                      DistillConfig())
