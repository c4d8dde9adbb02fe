"""DPO and GRPO adapters (moco_ray.training.preference): TRL's trainers under DeepSpeed ZeRO-2,
in-process on one rank and in Ray Train workers."""
from __future__ import annotations

import math
import time

import pytest
import torch
from distill_helpers import FACTS
from safetensors.torch import load_file

from moco_ray.config import DistillConfig
from moco_ray.models.checkpoint import verify_checkpoint
from moco_ray.training.preference import (
    GRPOSettings,
    PreferenceJob,
    _Reward,
    check_pairs,
    check_prompts,
    dpo_margins,
    dpo_train_adapters,
    grpo_train_adapter,
    train_local,
)

WRONG = ["Paris", "green", "mouse", "13"]
PAIRS = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": w}
         for (q, a), w in zip(FACTS, WRONG)]
LOCAL = DistillConfig(method="lora", output="adapter", lr=5e-3, batch_size=2, max_steps=8,
                      zero_stage=2, max_seq_len=128)


def _lora_b(adapter_dir: str) -> list[torch.Tensor]:
    w = load_file(f"{adapter_dir}/adapter_model.safetensors")
    bs = [v for k, v in w.items() if "lora_B" in k]
    assert bs
    return bs


def _dpo_loss(margins: list[float]) -> float:
    return sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(margins)


def test_dpo_grows_the_chosen_margin_against_the_frozen_base(tiny_models, tmp_path):
    base = tiny_models["student"]
    t0 = time.perf_counter()
    info = train_local("dpo", "student", base, PAIRS, str(tmp_path / "dpo"), LOCAL, beta=0.1)
    print(f"local DPO: {info.steps} steps in {time.perf_counter() - t0:.1f} s")
    # LoRA starts as a no-op (B = 0): policy == reference, so the first loss is exactly log 2.
    assert info.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert info.steps == 8 and info.losses[-1] < info.losses[0]
    manifest = verify_checkpoint(info.path)
    assert manifest["objective"] == "dpo" and manifest["output"] == "adapter"
    assert manifest["beta"] == 0.1 and manifest["margins"][-1] > 0
    # Recomputed independently: pi = base + adapter, ref = base with the adapter disabled.
    assert dpo_margins(base, None, PAIRS) == [0.0] * 4
    margins = dpo_margins(base, info.path, PAIRS, beta=0.1)
    assert all(m > 0 for m in margins)
    assert _dpo_loss(margins) < math.log(2) - 0.01
    # beta scales the margin linearly (same adapter, same log-prob differences).
    assert dpo_margins(base, info.path, PAIRS, beta=0.2) == pytest.approx(
        [2 * m for m in margins], rel=1e-5)


class PromptOnlyReward:
    """Differs between prompts, never within a group: per-group advantages are all 0."""

    def __call__(self, completion: str, row: dict) -> float:
        return float(row["qid"]) * 10.0


class LowIdsReward:
    """1 when the first sampled token has an id below 160 (half the tiny vocabulary)."""

    def __call__(self, completion: str, row: dict) -> float:
        ids = row["completion_ids"]
        return float(bool(ids) and ids[0] < 160)


def _low_mass(base: str, adapter: str | None, prompts: list[dict]) -> float:
    """Mean probability of ids < 160 at the first reply position."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    total = 0.0
    for row in prompts:
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            p = model(ids).logits[0, -1].softmax(-1)
        total += float(p[:160].sum())
    return total / len(prompts)


GRPO_PROMPTS = [{"prompt": [{"role": "user", "content": q}], "qid": i}
                for i, (q, _) in enumerate(FACTS)]
GRPO_CFG = DistillConfig(method="lora", output="adapter", lr=2e-2, batch_size=4, max_steps=6,
                         zero_stage=2, max_seq_len=128)
GRPO_SET = GRPOSettings(num_generations=4, max_completion_length=6, kl_beta=0.04)


def test_grpo_normalises_advantages_per_group(tiny_models, tmp_path):
    base = tiny_models["student"]
    # Rewards that only differ across prompts carry no advantage: nothing moves (the KL term
    # has zero gradient while policy == reference), so the adapter's B stays exactly 0.
    flat = train_local("grpo", "flat", base, GRPO_PROMPTS, str(tmp_path / "flat"), GRPO_CFG,
                       settings=GRPO_SET, reward_fn=PromptOnlyReward())
    assert all(torch.count_nonzero(b) == 0 for b in _lora_b(flat.path))
    assert flat.losses == [0.0] * 6
    mf = verify_checkpoint(flat.path)
    assert mf["objective"] == "grpo" and mf["settings"]["num_generations"] == 4
    # one group (one prompt) per step: the step's mean reward is that prompt's
    assert set(mf["rewards"]) <= {0.0, 10.0, 20.0, 30.0}


@pytest.mark.slow  # 10 GRPO steps with sampling: minutes on 2 cores
def test_grpo_learns_from_differences_within_a_group(tiny_models, tmp_path):
    base = tiny_models["student"]
    # One sampled token per completion: the reward (its id is low) acts on that token's
    # distribution directly; all 4 prompts x G = 16 completions per step.
    t0 = time.perf_counter()
    info = train_local("grpo", "low", base, GRPO_PROMPTS, str(tmp_path / "low"),
                       GRPO_CFG.model_copy(update={"batch_size": 64, "max_steps": 10,
                                                   "lr": 5e-2}),
                       settings=GRPO_SET.model_copy(update={"max_completion_length": 1,
                                                            "kl_beta": 0.0,
                                                            "num_generations": 16}),
                       reward_fn=LowIdsReward())
    print(f"local GRPO: {info.steps} steps in {time.perf_counter() - t0:.1f} s")
    assert any(torch.count_nonzero(b) > 0 for b in _lora_b(info.path))
    before, after = _low_mass(base, None, GRPO_PROMPTS), _low_mass(base, info.path, GRPO_PROMPTS)
    assert after > before + 0.1, (before, after)


def test_grpo_args_carry_group_size_kl_and_clipping():
    from moco_ray.training.preference import _training_args

    s = GRPOSettings(num_generations=8, kl_beta=0.02, epsilon=0.3, num_iterations=2)
    args = _training_args("grpo", GRPO_CFG.model_copy(update={"batch_size": 8}), 1, "/tmp/x",
                          0.0, s)
    assert (args.num_generations, args.beta, args.epsilon, args.num_iterations) == (
        8, 0.02, 0.3, 2)
    assert args.loss_type == "grpo" and args.scale_rewards == "group"
    assert args.deepspeed["zero_optimization"]["stage"] == 2
    dpo = _training_args("dpo", LOCAL, 2, "/tmp/x", 0.25, None)
    assert dpo.beta == 0.25 and dpo.deepspeed["train_batch_size"] == 4


def test_reward_wrapper_hands_each_completion_its_row():
    seen = []

    def fn(completion, row):
        seen.append((completion, row["qid"], row["completion_ids"]))
        return len(completion)

    r = _Reward(fn)
    out = r(prompts=["p0", "p0", "p1"], completions=[[{"role": "assistant", "content": "ab"}],
                                                     [{"role": "assistant", "content": "c"}],
                                                     [{"role": "assistant", "content": ""}]],
            completion_ids=[[1, 2], [3], []], qid=[0, 0, 1], trainer_state=None)
    assert out == [2.0, 1.0, 0.0]
    assert seen == [("ab", 0, [1, 2]), ("c", 0, [3]), ("", 1, [])]


def test_bad_rows_and_settings_are_named(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="row 1: key 'rejected'"):
        check_pairs([PAIRS[0], {"prompt": "q", "chosen": "a"}])
    with pytest.raises(ValueError, match="row 0: chosen and rejected are the same"):
        check_pairs([{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        check_pairs([{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a",
                      "rejected": "b"}])
    assert check_pairs([{"prompt": "q", "chosen": "a", "rejected": "b"}])[0]["prompt"] == [
        {"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="row 1: keys"):
        check_prompts([{"prompt": "a", "id": 1}, {"prompt": "b"}])
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo_train_adapter("g", tiny_models["student"], GRPO_PROMPTS, LowIdsReward(),
                           str(tmp_path / "g"), GRPO_CFG.model_copy(update={"batch_size": 3}))
    with pytest.raises(ValueError, match="zero_stage=2"):
        dpo_train_adapters([("m", tiny_models["student"], PAIRS, str(tmp_path / "m"))],
                           LOCAL.model_copy(update={"zero_stage": 3}))
    with pytest.raises(ValueError, match="output='adapter'"):
        dpo_train_adapters([("m", tiny_models["student"], PAIRS, str(tmp_path / "m"))],
                           LOCAL.model_copy(update={"output": "merged"}))
    with pytest.raises(ValueError, match="beta=0"):
        dpo_train_adapters([("m", tiny_models["student"], PAIRS, str(tmp_path / "m"))],
                           LOCAL, beta=0)
    with pytest.raises(ValueError, match="cannot fill one step"):
        dpo_train_adapters([("m", tiny_models["student"], PAIRS[:1], str(tmp_path / "m"))],
                           LOCAL)


@pytest.mark.slow  # two Ray Train runs, 2 gloo ranks each
def test_ray_train_two_dpo_adapters_at_once_one_on_two_gloo_ranks(ray_session, tiny_models,
                                                                  tmp_path):
    base = tiny_models["student"]
    cfg = LOCAL.model_copy(update={"batch_size": 1, "num_workers": 2, "max_steps": 6,
                                   "report_every": 3})
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS]
    t0 = time.perf_counter()
    infos = dpo_train_adapters([PreferenceJob("right", base, PAIRS, str(tmp_path / "right")),
                                PreferenceJob("wrong", base, swapped, str(tmp_path / "wrong"))],
                               cfg, beta=0.1)
    print(f"Ray Train DPO, 2 adapters x 2 workers: {time.perf_counter() - t0:.1f} s "
          f"({[round(i.seconds, 1) for i in infos.values()]})")
    for info in infos.values():
        assert verify_checkpoint(info.path)["world_size"] == 2
        assert info.losses[0] == pytest.approx(math.log(2), abs=1e-5)
        assert info.steps == 6 and info.losses[-1] < info.losses[0]
    # Each adapter prefers what its own pairs preferred.
    assert all(m > 0 for m in dpo_margins(base, infos["right"].path, PAIRS))
    assert all(m < 0 for m in dpo_margins(base, infos["wrong"].path, PAIRS))
