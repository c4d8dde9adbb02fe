"""Warm trainers (`launch.keep_warm`): one long-lived Ray Train run trains model after model,
each exactly as a fresh run would, and a model that fails on the workers does not stop it."""
from __future__ import annotations

import shutil

import pytest
from test_preference import LOCAL, PAIRS
from transformers import AutoTokenizer

from moco_ray.config import DistillConfig
from moco_ray.models.checkpoint import verify_checkpoint
from moco_ray.training import distill_all, launch
from moco_ray.training.data import tokenize_rows
from moco_ray.training.preference import PreferenceJob, dpo_margins, dpo_train_adapters
from moco_ray.training.trainer import run_training


@pytest.fixture
def warm():
    launch.keep_warm(True)
    yield
    hosts = launch.warm_trainers()
    launch.keep_warm(False)
    assert not any(h.alive for h in hosts.values())  # stopped, its workers gone


def test_one_warm_run_trains_sft_and_dpo_adapters_and_outlives_a_failed_model(
        warm, ray_session, tiny_models, memo_rows, tmp_path):
    base = tiny_models["student"]
    # Two ranks (rank 0 hands every job to the other), 2 x batch 2 = all 4 rows every step: the
    # same steps as one rank with batch 4, trained here in this process for reference.
    cfg = DistillConfig(method="lora", output="adapter", batch_size=2, num_workers=2, lr=1e-2,
                        max_steps=4)
    one_rank = cfg.model_copy(update={"num_workers": 1, "batch_size": 4})
    alone = run_training(one_rank, base, tokenize_rows(
        memo_rows, AutoTokenizer.from_pretrained(base), cfg.max_seq_len))
    infos = distill_all([("a", base, memo_rows, str(tmp_path / "a")),
                         ("b", base, memo_rows, str(tmp_path / "b"))], cfg)
    for info in infos.values():
        assert info.losses == pytest.approx(alone.losses, rel=1e-3)  # as a fresh run trains
        assert verify_checkpoint(info.path)["output"] == "adapter"
    [host] = launch.warm_trainers().values()
    assert host.alive and host.runs == 1

    # Weights missing: config.json passes the driver's checks, loading fails on the worker.
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(RuntimeError, match=r"failed for bad: .*model 'bad' failed: \w+Error"):
        distill_all([("bad", str(broken), memo_rows, str(tmp_path / "bad"))], cfg)

    # The same run goes on, and a DPO adapter trains on it as on its own run.
    dcfg = LOCAL.model_copy(update={"batch_size": 1, "num_workers": 2, "max_steps": 6})
    dpo = dpo_train_adapters([PreferenceJob("right", base, PAIRS, str(tmp_path / "right"))],
                             dcfg, beta=0.1)["right"]
    assert all(m > 0 for m in dpo_margins(base, dpo.path, PAIRS))
    assert host.alive and host.runs == 1 and len(launch.warm_trainers()) == 1

    with launch.cold():  # trainings here start their own run; the warm one waits
        distill_all([("c", base, memo_rows, str(tmp_path / "c"))], cfg)
    assert host.alive and host.runs == 1
    assert verify_checkpoint(tmp_path / "c")["losses"] == pytest.approx(alone.losses, rel=1e-3)
