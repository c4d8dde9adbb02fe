"""Several models trained in turn in one Ray Train run (`runs=k`): the packing, that each model
trains exactly as it would alone, and that a model failing mid-run loses nothing done before it
and stops nothing after it."""
from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
from test_preference import LOCAL, PAIRS
from transformers import AutoTokenizer

from moco_ray.config import DistillConfig
from moco_ray.models.checkpoint import verify_checkpoint
from moco_ray.training import DistillJob, distill_all
from moco_ray.training.data import tokenize_rows
from moco_ray.training.launch import Planned, pack
from moco_ray.training.preference import PreferenceJob, dpo_margins, dpo_train_adapters
from moco_ray.training.runs import first_cause
from moco_ray.training.trainer import release_engine, run_training


def _planned(name: str, **cfg) -> Planned:
    return Planned(SimpleNamespace(model=name), DistillConfig(**cfg), {})


def test_pack_deals_models_round_robin_and_keeps_scaling_setups_apart():
    ps = [_planned("a"), _planned("b"), _planned("c", num_workers=2), _planned("d"),
          _planned("e", num_workers=2)]
    names = lambda groups: [[p.job.model for p in g] for g in groups]
    assert names(pack(ps, None)) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert names(pack(ps, 1)) == [["a", "b", "d"], ["c", "e"]]
    assert names(pack(ps, 2)) == [["a", "d"], ["b"], ["c"], ["e"]]
    assert names(pack(ps, 9)) == [["a"], ["b"], ["d"], ["c"], ["e"]]
    with pytest.raises(ValueError, match="runs=0"):
        pack(ps, 0)


def test_first_cause_finds_the_root_of_a_chain_and_of_a_remote_traceback():
    try:
        try:
            raise KeyError("messages")
        except KeyError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as e:
        assert first_cause(e) == "KeyError: 'messages'"
    # A remote error: its causes arrive as traceback text, root first.
    remote = RuntimeError("ray::Map()\nTraceback (most recent call last):\n  File x\n"
                          "ValueError: row id='q7': no assistant turn\n\nThe above ...\n"
                          "ray.exceptions.UserCodeException: UDF failed")
    assert first_cause(remote) == "ValueError: row id='q7': no assistant turn"
    assert first_cause(OSError("disk full")) == "OSError: disk full"


def test_models_in_one_run_train_in_turn_as_alone_and_a_failure_loses_nothing(
        ray_session, tiny_models, memo_rows, tmp_path):
    import ray.data

    base = tiny_models["student"]
    cfg = DistillConfig(method="lora", output="adapter", batch_size=2, lr=1e-2, max_steps=4)
    alone = run_training(cfg, base, tokenize_rows(memo_rows, AutoTokenizer.from_pretrained(base),
                                                  cfg.max_seq_len))  # one rank, in this process
    # Checked only when the worker reads it (a Ray Dataset is tokenized lazily), so it fails
    # mid-run, after "a" and "b" trained in the same worker processes.
    bad = ray.data.from_items([{"id": "q7", "messages": [{"role": "user", "content": "hi"}]}
                               for _ in range(4)])
    jobs = [DistillJob("a", base, memo_rows, str(tmp_path / "a")),
            DistillJob("b", base, memo_rows, str(tmp_path / "b")),
            DistillJob("bad", base, bad, str(tmp_path / "bad")),
            DistillJob("c", base, memo_rows, str(tmp_path / "c"))]
    with pytest.raises(RuntimeError, match=r"(?s)failed for bad: .*no assistant turn") as err:
        distill_all(jobs, cfg, runs=1)
    assert "a:" not in str(err.value) and "c:" not in str(err.value)
    manifests = {n: verify_checkpoint(tmp_path / n) for n in "abc"}
    assert not (tmp_path / "bad").exists()
    # "b" began after "a" ended: one after the other, not side by side.
    assert manifests["b"]["train_entered"] >= manifests["a"]["train_finished"]
    # The same losses as the model trained alone: nothing of "a" (optimizer, adapter, seed
    # state) leaked into "b", nor of the failed job into "c" (trained in a fresh run).
    for m in manifests.values():
        assert m["losses"] == pytest.approx(alone.losses, rel=1e-5)
        assert m["losses"][-1] < m["losses"][0]


def test_two_dpo_adapters_in_one_run_each_learn_their_own_pairs(ray_session, tiny_models,
                                                                tmp_path):
    base = tiny_models["student"]
    cfg = LOCAL.model_copy(update={"batch_size": 1, "max_steps": 6, "report_every": 3})
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS]
    infos = dpo_train_adapters([PreferenceJob("right", base, PAIRS, str(tmp_path / "right")),
                                PreferenceJob("wrong", base, swapped, str(tmp_path / "wrong"))],
                               cfg, beta=0.1, runs=1)
    assert infos["wrong"].train_entered >= infos["right"].train_finished  # in turn
    # TRL's second trainer in the same process starts from the base, not from the first's
    # adapter: each prefers what its own pairs preferred.
    assert all(m > 0 for m in dpo_margins(base, infos["right"].path, PAIRS))
    assert all(m < 0 for m in dpo_margins(base, infos["wrong"].path, PAIRS))


def test_a_released_engine_frees_its_model(tiny_models, memo_rows):
    # DeepSpeed's hooks keep an engine reachable after the loop: a process that trains model
    # after model (a run in turn, a warm trainer) kept every one of them until this.
    base = tiny_models["student"]
    cfg = DistillConfig(method="lora", output="adapter", batch_size=2, max_steps=1)
    state = run_training(cfg, base, tokenize_rows(memo_rows, AutoTokenizer.from_pretrained(base),
                                                  cfg.max_seq_len))
    model = weakref.ref(state.engine.module)
    release_engine(state.engine)
    del state
    gc.collect()
    assert model() is None
