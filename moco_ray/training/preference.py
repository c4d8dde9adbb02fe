"""Preference and RL training of LoRA adapters: DPO (pairs) and GRPO (prompts + a reward).

Both run TRL's trainers (`trl.DPOTrainer`, `trl.GRPOTrainer`) inside Ray Train `TorchTrainer`
workers, with DeepSpeed (ZeRO 0 or 2, gloo on CPU / NCCL on GPU) configured from the same
`DistillConfig` the distillation trainer uses, one TorchTrainer per model, all at once (or packed
into fewer runs that train their models in turn: `runs=`, see `launch.pack`):

    infos = dpo_train_adapters([PreferenceJob("m1", base_dir, pairs, out_dir)], cfg, beta=0.1)
    info = grpo_train_adapter("agg", base_dir, prompts, reward_fn, out_dir, cfg, GRPOSettings())

Every result is a peft adapter dir with a `moco_checkpoint.json` manifest (`verify_checkpoint`
checks it), served by vLLM as a per-request LoRA adapter.

DPO (Rafailov et al. 2023): loss -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) -
(log pi(y_l) - log ref(y_l)))), log-probs summed over the reply tokens. The reference is the frozen
base, i.e. the same model with the adapter disabled; when training continues from an earlier
adapter (`init_adapter`), TRL keeps a frozen copy of that adapter as the reference instead.

GRPO (Shao et al. 2024): per prompt, G completions sampled inside the worker with the policy's
own `generate`; advantage = (r - mean of its group) / std of its group; loss = -mean over tokens
of min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_beta * KL(policy || reference), the
reference being the adapter-disabled base.

A reward function is any picklable callable `reward_fn(completion: str, row: dict) -> float`;
`row` is the prompt row (its extra keys, e.g. an example id) plus `completion_ids`, the sampled
token ids. It runs inside the training workers.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from moco_ray.config.distill import DistillConfig, GRPOSettings, deepspeed_config
from moco_ray.models.checkpoint import CheckpointInfo, write_manifest
from moco_ray.training.launch import Planned, check_distinct, preload_imports, train_packed
from moco_ray.training.runs import checkpoint_info
from moco_ray.training.trainer import ensure_process_group, release_engine
from moco_ray.training.warm import WarmTrainers

RewardFn = Callable[[str, dict], float]
Kind = Literal["dpo", "grpo"]

# Small adapters on a few hundred dev rows, as training.DEFAULT_ADAPTER; a smaller batch because
# every DPO row is two sequences and every GRPO step samples a group per prompt.
PREFERENCE_ADAPTER = DistillConfig(method="lora", output="adapter", lora_r=8, lora_alpha=16.0,
                                   lr=5e-4, batch_size=2, max_steps=30, zero_stage=2,
                                   report_every=10, max_seq_len=512)


class PreferenceJob(NamedTuple):
    """One adapter to train: its name, the model dir it starts from, its rows (DPO pairs or GRPO
    prompts), where to save, and optionally an adapter dir to continue from."""

    model: str
    base_model_dir: str
    rows: list[dict]
    out_dir: str
    init_adapter: str | None = None


# --- rows -----------------------------------------------------------------------------------

def _messages(value: Any, index: int, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"row {index}: key {key!r} must be a non-empty list of chat messages "
                         f"or a string, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"row {index}: {key}[{j}] must be {{'role': 'system'|'user'|"
                             f"'assistant', 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        raise ValueError(f"row {index}: {key} ends with an assistant turn; the prompt is what the "
                         "model answers, so it must end with a user (or system) message")
    return out


def check_pairs(pairs: list[dict]) -> list[dict]:
    """DPO rows `{"prompt": messages | str, "chosen": str, "rejected": str}` in TRL's
    conversational form; ValueError naming the row and key otherwise."""
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("DPO needs a non-empty list of {'prompt', 'chosen', 'rejected'} rows")
    out = []
    for i, row in enumerate(pairs):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")  # noqa: TRY004
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(  # noqa: TRY004 (every row problem is a ValueError)
                    f"row {i}: key {key!r} must be the reply text (str), got "
                    f"{type(row.get(key)).__name__}")
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"row {i}: chosen and rejected are the same text; such a pair "
                             "teaches nothing (drop ties before DPO)")
        out.append({"prompt": _messages(row.get("prompt"), i, "prompt"),
                    "chosen": [{"role": "assistant", "content": row["chosen"]}],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}]})
    return out


def check_prompts(rows: list[dict]) -> list[dict]:
    """GRPO rows `{"prompt": messages | str, **extra}`; extras (str, int, float, bool) reach the
    reward function. ValueError naming the row and key otherwise."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("GRPO needs a non-empty list of {'prompt': ...} rows")
    out, keys = [], None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")  # noqa: TRY004
        extra = {k: v for k, v in row.items() if k != "prompt"}
        for k, v in extra.items():
            if k in ("completion", "completion_ids") or not isinstance(v, (str, int, float, bool)):
                raise ValueError(f"row {i}: key {k!r} must be a str/int/float/bool column and not "
                                 "'completion' or 'completion_ids'")
        if keys is None:
            keys = set(extra)
        elif set(extra) != keys:
            raise ValueError(f"row {i}: keys {sorted(extra)} differ from row 0's {sorted(keys)}; "
                             "every row needs the same columns")
        out.append({"prompt": _messages(row.get("prompt"), i, "prompt"), **extra})
    return out


def _check_cfg(cfg: DistillConfig, kind: Kind, settings: GRPOSettings | None) -> None:
    if cfg.method != "lora" or cfg.output != "adapter":
        raise ValueError(f"{kind} trains a LoRA adapter served per request: use method='lora', "
                         f"output='adapter' (got method={cfg.method!r}, output={cfg.output!r})")
    if cfg.zero_stage == 3:
        raise ValueError(f"{kind} runs DeepSpeed ZeRO 0 or 2 (the adapter is small; ZeRO-3 "
                         "would gather weights for every sampled token); fix: zero_stage=2")
    if cfg.kd_weight:
        raise ValueError(f"kd_weight={cfg.kd_weight}: {kind} has no KD term; fix: kd_weight=0")
    if kind == "grpo":
        assert settings is not None
        per_step = cfg.batch_size * cfg.grad_accum * cfg.num_workers
        if per_step % settings.num_generations:
            raise ValueError(
                f"GRPO samples whole groups: batch_size * grad_accum * num_workers = {per_step} "
                f"completions per step must be a multiple of num_generations = "
                f"{settings.num_generations}; fix: e.g. batch_size={settings.num_generations}")


# --- the worker side ------------------------------------------------------------------------

class _Reward:
    """TRL's reward-function signature around `reward_fn(completion, row)`."""

    def __init__(self, fn: RewardFn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list[float]:
        skip = {"trainer_state", "log_extra", "log_metric", "environments"}
        cols = {k: v for k, v in columns.items() if k not in skip}
        out = []
        for i, comp in enumerate(completions):
            text = comp[-1]["content"] if isinstance(comp, list) else str(comp)
            row = {k: v[i] for k, v in cols.items()}
            row["prompt"] = prompts[i]
            row["completion_ids"] = list(completion_ids[i]) if completion_ids is not None else []
            out.append(float(self.fn(text, row)))
        return out


def _training_args(kind: Kind, cfg: DistillConfig, world: int, out: str, beta: float,
                   settings: GRPOSettings | None):
    """TRL's config for this run; DeepSpeed's dict is `deepspeed_config`, which agrees with it
    (batch sizes, clipping, bf16) as transformers checks."""
    common = {
        "output_dir": out, "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum, "learning_rate": cfg.lr,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "max_steps": cfg.max_steps or -1,
        "num_train_epochs": cfg.epochs, "seed": cfg.seed, "data_seed": cfg.seed,
        "use_cpu": not cfg.use_gpu, "bf16": cfg.bf16, "fp16": False,
        "deepspeed": deepspeed_config(cfg, world), "report_to": [], "logging_steps": 1,
        "save_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0,
        "remove_unused_columns": False}
    if kind == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, beta=beta, max_length=cfg.max_seq_len)
    from trl import GRPOConfig

    assert settings is not None
    return GRPOConfig(
        **common, num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length, beta=settings.kl_beta,
        epsilon=settings.epsilon, num_iterations=settings.num_iterations,
        loss_type=settings.loss_type, scale_rewards=settings.scale_rewards,
        temperature=settings.temperature, top_p=settings.top_p)


def _lora(cfg: DistillConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")


def run_preference(kind: Kind, cfg: DistillConfig, base_model_dir: str, rows: list[dict],
                   out_dir: str | None, *, beta: float = 0.1,
                   settings: GRPOSettings | None = None, reward_fn: RewardFn | None = None,
                   init_adapter: str | None = None, model_name: str = "model",
                   on_log: Callable[[dict], None] | None = None,
                   ray_worker: bool = False) -> dict | None:
    """Train on this rank (collective: every rank calls it; rows are checked rows, every rank
    gets all of them and TRL's sampler shards them). Rank 0 saves the adapter into `out_dir` and
    returns its manifest; other ranks return None."""
    entered = time.time()
    import deepspeed
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not ray_worker:  # one local rank: what accelerate reads when no launcher set it up
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                     ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
    ensure_process_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(cfg.seed)  # same adapter init on every rank
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    peft_config = _lora(cfg)
    if init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        peft_config = None
    if kind == "dpo":
        model.config.use_cache = False
    log: list[dict] = []
    started: list[float] = []

    class _Log(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            started.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                entry = {"step": state.global_step, **{k: float(v) for k, v in logs.items()
                                                       if isinstance(v, (int, float))}}
                log.append(entry)
                if on_log is not None:
                    on_log(entry)

    with tempfile.TemporaryDirectory(prefix=f"moco_{kind}_") as scratch:
        args = _training_args(kind, cfg, world, scratch, beta, settings)
        data = Dataset.from_list(rows)
        if kind == "dpo":
            from trl import DPOTrainer

            trainer = DPOTrainer(model=model, args=args, train_dataset=data,
                                 processing_class=tokenizer, peft_config=peft_config)
        else:
            from trl import GRPOTrainer

            if reward_fn is None:
                raise ValueError("GRPO needs a reward_fn(completion, row) -> float")
            trainer = GRPOTrainer(model=model, reward_funcs=[_Reward(reward_fn)], args=args,
                                  train_dataset=data, processing_class=tokenizer,
                                  peft_config=peft_config)
        if ray_worker:
            from ray.train.huggingface.transformers import prepare_trainer

            trainer = prepare_trainer(trainer)
        trainer.add_callback(_Log())
        trainer.train()
        finished = time.time()
    try:
        if rank != 0:
            return None
        assert out_dir is not None, "rank 0 needs an out_dir"
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # ZeRO 0/2 keep whole weights on every rank; save only the trained adapter (TRL may hold a
        # frozen 'ref' copy of an initial adapter next to it).
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            str(out), selected_adapters=["default"])
        tokenizer.save_pretrained(str(out))
        losses = [e["loss"] for e in log]
        extra = {"margins": [e.get("rewards/margins") for e in log]} if kind == "dpo" else {
            "rewards": [e.get("reward") for e in log], "kl": [e.get("kl") for e in log],
            "settings": settings.model_dump() if settings else None}
        return write_manifest(out, {
            "model": model_name, "base_model": str(base_model_dir), "method": "lora",
            "output": "adapter", "objective": kind, "beta": beta if kind == "dpo" else None,
            "init_adapter": init_adapter, "zero_stage": cfg.zero_stage, "world_size": world,
            "steps": len(losses), "final_loss": losses[-1] if losses else None, "losses": losses,
            **extra, "train_entered": entered, "train_started": started[0] if started else entered,
            "train_finished": finished, "config": cfg.model_dump(mode="json")})
    finally:  # free the model now: later trainings in this process need the memory
        release_engine(getattr(trainer, "deepspeed", None))
        trainer.accelerator.free_memory()


def preference_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: train, report losses every `report_every` steps (every rank reports
    after the same steps), then rank 0 reports the adapter as a checkpoint whose metrics name
    `config["job"]` (a `launch.in_turn_worker` run trains several adapters this way). On a warm
    trainer (`config["out_dir"]` set) rank 0 writes the adapter there and reports nothing."""
    import ray.train
    import torch

    cfg = DistillConfig.model_validate(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    pending: list[dict] = []

    def on_log(entry: dict) -> None:
        pending.append(entry)
        if len(pending) == cfg.report_every:
            ray.train.report({**pending[-1], "losses": [e["loss"] for e in pending]})
            pending.clear()

    settings = GRPOSettings.model_validate(config["settings"]) if config["settings"] else None
    warm = "out_dir" in config  # a warm trainer: rank 0 writes the adapter where the driver wants
    with tempfile.TemporaryDirectory(prefix="moco_pref_ckpt_") as tmp:
        manifest = run_preference(
            config["kind"], cfg, config["base_model_dir"], config["rows"],
            (config["out_dir"] if warm else tmp) if rank == 0 else None, beta=config["beta"],
            settings=settings, reward_fn=config["reward_fn"],
            init_adapter=config["init_adapter"], model_name=config["model_name"],
            on_log=None if warm else on_log, ray_worker=True)
        if warm:  # the adapter is in place; the run itself reports nothing
            return
        if rank == 0:
            assert manifest is not None
            ray.train.report({"job": config.get("job"), "step": manifest["steps"],
                              "loss": manifest["final_loss"]},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({"job": config.get("job"), "step": -1, "loss": float("nan")})


# --- the driver side ------------------------------------------------------------------------

def _check_job(job: PreferenceJob) -> None:
    if not (Path(job.base_model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"job {job.model!r}: base_model_dir {job.base_model_dir!r} has "
                                "no config.json; pass a local model dir (e.g. models.resolve_path)")
    out = Path(job.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"job {job.model!r}: out_dir {str(out)!r} is not empty; "
                              "fix: pick a new dir or delete the old adapter")
    if job.init_adapter is not None and not (Path(job.init_adapter)
                                             / "adapter_config.json").is_file():
        raise FileNotFoundError(f"job {job.model!r}: init_adapter {job.init_adapter!r} has no "
                                "adapter_config.json")


def _run_all(kind: Kind, jobs: list[PreferenceJob], cfg: DistillConfig, beta: float,
             settings: GRPOSettings | None, reward_fn: RewardFn | None,
             runs: int | None = None, warm: WarmTrainers | None = None
             ) -> dict[str, CheckpointInfo]:
    preload_imports()
    check_distinct(jobs, "adapter")
    for j in jobs:
        _check_job(j)
    planned = [Planned(j, cfg, {
        "kind": kind, "cfg": cfg.model_dump(mode="json"), "model_name": j.model,
        "base_model_dir": str(Path(j.base_model_dir).resolve()), "rows": j.rows, "beta": beta,
        "settings": settings.model_dump() if settings else None, "reward_fn": reward_fn,
        "init_adapter": j.init_adapter}) for j in jobs]
    return train_packed(planned, preference_worker, kind, runs, warm)


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0 (the DPO temperature); fix: use 0.1")


def dpo_train_adapters(jobs: list[PreferenceJob] | list[tuple], cfg: DistillConfig | None = None,
                       beta: float = 0.1, runs: int | None = None,
                       warm: WarmTrainers | None = None) -> dict[str, CheckpointInfo]:
    """DPO-train one LoRA adapter per job, all at once (one TorchTrainer each, from driver
    threads), or packed into at most `runs` runs that train their adapters in turn. Job rows are
    `{"prompt", "chosen", "rejected"}` pairs. Returns {name: info}; if some fail, the others
    still finish and one error names every failed job."""
    cfg = cfg or PREFERENCE_ADAPTER
    _check_cfg(cfg, "dpo", None)
    _check_beta(beta)
    jobs = [PreferenceJob(*j) for j in jobs]
    jobs = [j._replace(rows=check_pairs(j.rows)) for j in jobs]
    for j in jobs:
        _need_rows(j, cfg, len(j.rows))
    return _run_all("dpo", jobs, cfg, beta, None, None, runs, warm)


def grpo_train_adapter(model: str, base_model_dir: str, prompts: list[dict],
                       reward_fn: RewardFn, out_dir: str, cfg: DistillConfig | None = None,
                       settings: GRPOSettings | None = None,
                       init_adapter: str | None = None,
                       warm: WarmTrainers | None = None) -> CheckpointInfo:
    """GRPO-train one LoRA adapter on `prompts` (`{"prompt": ..., **extra}` rows) with the
    picklable `reward_fn(completion, row) -> float`, in one TorchTrainer."""
    cfg = cfg or PREFERENCE_ADAPTER.model_copy(update={"batch_size": 4})
    settings = settings or GRPOSettings()
    _check_cfg(cfg, "grpo", settings)
    if not callable(reward_fn):
        raise ValueError(  # noqa: TRY004 (a bad argument, named)
            "reward_fn must be a callable reward_fn(completion, row) -> float")
    job = PreferenceJob(model, base_model_dir, check_prompts(prompts), out_dir, init_adapter)
    _need_rows(job, cfg, len(job.rows) * settings.num_generations)
    return _run_all("grpo", [job], cfg, 0.0, settings, reward_fn, warm=warm)[model]


def _need_rows(job: PreferenceJob, cfg: DistillConfig, n: int) -> None:
    if n < cfg.rows_per_step:
        raise ValueError(f"job {job.model!r}: {n} training rows cannot fill one step of "
                         f"batch_size * grad_accum * num_workers = {cfg.rows_per_step}; "
                         "fix: add rows or lower those settings")


def train_local(kind: Kind, model: str, base_model_dir: str, rows: list[dict], out_dir: str,
                cfg: DistillConfig | None = None, *, beta: float = 0.1,
                settings: GRPOSettings | None = None, reward_fn: RewardFn | None = None,
                init_adapter: str | None = None) -> CheckpointInfo:
    """One adapter in this process on one rank (no Ray): the same trainer and manifest as a
    worker. For tests and debugging; `cfg.num_workers` must be 1."""
    cfg = cfg or PREFERENCE_ADAPTER
    settings = settings or (GRPOSettings() if kind == "grpo" else None)
    _check_cfg(cfg, kind, settings)
    if cfg.num_workers != 1:
        raise ValueError(f"train_local runs one rank; num_workers={cfg.num_workers}; fix: use "
                         "dpo_train_adapters / grpo_train_adapter for more workers")
    if kind == "dpo":
        _check_beta(beta)
    checked = check_pairs(rows) if kind == "dpo" else check_prompts(rows)
    job = PreferenceJob(model, base_model_dir, checked, out_dir, init_adapter)
    _check_job(job)
    t0 = time.perf_counter()
    run_preference(kind, cfg, base_model_dir, checked, out_dir, beta=beta, settings=settings,
                   reward_fn=reward_fn, init_adapter=init_adapter, model_name=model)
    return checkpoint_info(model, out_dir, time.perf_counter() - t0)


# --- evaluation helpers ---------------------------------------------------------------------

def reply_logprobs(model, tokenizer, prompt: list[dict], replies: list[str]) -> list[float]:
    """Summed log-probability of each reply after `prompt` (chat template, generation prompt),
    the quantity DPO's implicit reward is built from."""
    import torch

    prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for reply in replies:
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": reply}], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[:len(p_ids)] != p_ids:
            raise ValueError("the chat template does not render the prompt as a prefix of the "
                             "conversation; reply log-probs cannot be located")
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        target = torch.tensor(ids[1:])
        tok = logp.gather(-1, target[:, None])[:, 0]
        out.append(float(tok[len(p_ids) - 1:].sum()))
    return out


def dpo_margins(base_model_dir: str, adapter_dir: str | None, pairs: list[dict],
                beta: float = 0.1) -> list[float]:
    """Per pair, beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))) with pi
    the base plus `adapter_dir` and ref the base alone (adapter disabled); -log sigmoid of it is
    the pair's DPO loss. With adapter_dir None, pi = ref and every margin is 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    margins = []
    for row in check_pairs(pairs):
        replies = [row["chosen"][0]["content"], row["rejected"][0]["content"]]
        pol = reply_logprobs(model, tok, row["prompt"], replies)
        if adapter_dir is None:
            ref = pol
        else:
            with model.disable_adapter():
                ref = reply_logprobs(model, tok, row["prompt"], replies)
        margins.append(beta * ((pol[0] - ref[0]) - (pol[1] - ref[1])))
    return margins
