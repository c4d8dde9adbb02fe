"""Distillation settings (pydantic, frozen) and the DeepSpeed config built from them.

Every problem a user can make is collected by one validator and raised at once, each line naming
the field, the value and the fix, so a bad config fails on the driver before any worker starts.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moco_ray.config.base import CustomResources

# Above this many rows per model, `ingest: auto` streams the data through Ray Data.
DRIVER_INGEST_MAX_ROWS = 20_000


class DistillConfig(BaseModel):
    """How to distill one model (every model of a `distill_all` call shares it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["lora", "full"] = Field(
        "lora", description="'lora': train low-rank adapters (peft); 'full': train every weight")
    lora_r: int = Field(8, description="LoRA rank (method='lora')")
    lora_alpha: float = Field(16.0, description="LoRA scaling numerator; the update is alpha/r")
    lora_dropout: float = Field(0.0, description="dropout on the LoRA input, in [0, 1)")
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names that get adapters, or 'all-linear' (every linear "
        "layer but the output head)")
    zero_stage: Literal[0, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 0 plain data parallel, 2 shards optimizer state and "
        "gradients, 3 also shards the weights (gathered again on save)")
    lr: float = Field(1e-4, description="AdamW learning rate (constant)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, description="gradient clipping norm; 0 turns clipping off")
    epochs: int = Field(1, description="passes over the data (ignored when max_steps is set)")
    max_steps: int | None = Field(
        None, description="optimizer steps to run; the data repeats (reshuffled) as needed")
    batch_size: int = Field(4, description="rows per device per micro-batch")
    grad_accum: int = Field(1, description="micro-batches accumulated per optimizer step")
    max_seq_len: int = Field(1024, description="tokens per row at most (longer rows are cut)")
    seed: int = Field(0, description="seed for adapter init, shuffling and dropout")
    kd_weight: float = Field(
        0.0, description="weight of the logit-KD term on rows with teacher_topk; 0 = pure SFT")
    kd_temperature: float = Field(
        1.0, description="softmax temperature of the KD term (the term is scaled by T^2)")
    report_every: int = Field(
        10, description="steps per ray.train.report; each report carries the loss of every step "
        "since the last. A report waits for the Ray Train controller's poll (2 s in Ray 2.60), so "
        "1 caps training at one step per poll")
    ingest: Literal["auto", "ray_data", "driver"] = Field(
        "auto", description="how an evolution run's Parquet SFT data reaches the trainers: "
        "'ray_data' streams it through Ray Data (read and tokenized by Ray Data tasks, split "
        "over the ranks); 'driver' reads it with pyarrow and tokenizes it on the driver; 'auto': "
        f"driver up to {DRIVER_INGEST_MAX_ROWS} rows per model, else ray_data. Each Ray Data "
        "read starts worker processes (~10 s on 2 cores), more than a small model's training")
    num_workers: int = Field(1, description="Ray Train workers (data-parallel ranks) per model")
    cpus_per_worker: float = Field(1.0, description="CPUs Ray reserves for each worker")
    resources_per_worker: CustomResources = Field(
        default_factory=dict, description="custom Ray resources each worker reserves beside "
        "its CPUs (and GPU), e.g. {trainer_node: 1} to place the trainers on the nodes that "
        "have it")
    use_gpu: bool = Field(False, description="one GPU per worker and NCCL; else CPU and gloo. "
                          "Unset beside a pool on GPUs: true (see on_gpu_pool)")
    bf16: bool = Field(False, description="train in bfloat16 with fp32 master weights (GPU). "
                       "Unset beside a pool on GPUs: true")
    output: Literal["merged", "adapter"] = Field(
        "merged", description="'merged': LoRA folded into full weights (a plain model dir); "
        "'adapter': the peft adapter dir (method='lora' only)")
    storage_path: str | None = Field(
        None, description="Ray Train storage for the run (shared storage on multi-node "
        "clusters); None = a temp dir on the driver, removed after the checkpoint is copied out")
    max_failures: int = Field(
        1, description="Ray Train restarts of a run whose worker group failed (a worker or its "
        "node died; Ray Train's FailureConfig). A restart continues from the last resume "
        "checkpoint (checkpoint_every), else from the model's first step; models the run had "
        "finished are not trained again. A failure in the training code itself also counts")
    checkpoint_every: int | None = Field(
        None, description="optimizer steps between resume checkpoints (DeepSpeed engine and "
        "optimizer state plus each rank's RNG state, through Ray Train's storage); None: none, "
        "a restarted run trains the model from its first step")

    def ingest_on_driver(self, n_rows: int) -> bool:
        """Whether `n_rows` SFT rows per model are read and tokenized on the driver."""
        return self.ingest == "driver" or (self.ingest == "auto"
                                           and n_rows <= DRIVER_INGEST_MAX_ROWS)

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        problems = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(self.lora_r >= 1, f"lora_r={self.lora_r} must be >= 1; fix: use 8 or 16")
        need(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0; fix: use 2 * lora_r")
        need(0 <= self.lora_dropout < 1,
             f"lora_dropout={self.lora_dropout} must be in [0, 1); fix: use 0.0 or 0.05")
        need(isinstance(self.lora_target_modules, str) or len(self.lora_target_modules) > 0,
             "lora_target_modules=[] names no module; fix: use 'all-linear' or e.g. "
             "['q_proj', 'v_proj']")
        need(self.lr > 0, f"lr={self.lr} must be > 0; fix: use e.g. 1e-4 (LoRA) or 1e-5 (full)")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.max_grad_norm >= 0,
             f"max_grad_norm={self.max_grad_norm} must be >= 0; fix: 1.0, or 0 for no clipping")
        need(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1,
             f"max_steps={self.max_steps} must be >= 1; fix: a positive count or None (epochs)")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        need(self.max_seq_len >= 8, f"max_seq_len={self.max_seq_len} must be >= 8")
        need(self.kd_weight >= 0, f"kd_weight={self.kd_weight} must be >= 0; fix: 0 for pure SFT")
        need(self.kd_temperature > 0,
             f"kd_temperature={self.kd_temperature} must be > 0; fix: use 1.0")
        need(self.report_every >= 1, f"report_every={self.report_every} must be >= 1")
        need(self.max_failures >= 0, f"max_failures={self.max_failures} must be >= 0")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"checkpoint_every={self.checkpoint_every} must be >= 1; fix: e.g. 50, or None")
        need(self.num_workers >= 1, f"num_workers={self.num_workers} must be >= 1")
        need(self.cpus_per_worker > 0,
             f"cpus_per_worker={self.cpus_per_worker} must be > 0; fix: use 1")
        need(not (self.output == "adapter" and self.method == "full"),
             "output='adapter' needs method='lora' (full fine-tuning has no adapter); "
             "fix: set output='merged' or method='lora'")
        if problems:
            raise ValueError("DistillConfig has problems:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def rows_per_step(self) -> int:
        """Rows one optimizer step consumes across all workers."""
        return self.batch_size * self.grad_accum * self.num_workers


def deepspeed_config(cfg: DistillConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `deepspeed.initialize(config=...)`."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Gather sharded weights on save through GatheredParameters (see checkpoint.py), so
        # DeepSpeed need not keep a 16-bit copy for save_16bit_model.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        # We hand DeepSpeed a torch AdamW: its fused/CPU Adam ops need a compiler toolchain.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # we report losses ourselves
        "wall_clock_breakdown": False,
    }


class GRPOSettings(BaseModel):
    """The GRPO side of a run (the optimiser, LoRA and DeepSpeed side is the DistillConfig)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_generations: int = Field(4, ge=2, description="group size G: completions per prompt")
    kl_beta: float = Field(0.04, ge=0.0, description="weight of KL(policy || base); 0 drops it")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="ratio clipping: [1-eps, 1+eps]")
    num_iterations: int = Field(1, ge=1, description="policy updates per sampled batch (mu); "
                                "above 1 the ratio leaves 1 and clipping acts")
    max_completion_length: int = Field(256, ge=1, description="new tokens per sampled completion")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the policy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="'grpo': each sequence's token mean, then the batch mean (the GRPO "
        "paper); the others are TRL's length-debiased variants")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's reward std ('group', GRPO), the "
        "batch's, or not at all (Dr. GRPO)")


# A job's adapters are small and train on a few hundred dev rows: LoRA r=8 on every linear layer,
# served as an adapter (never merged: the pool's weights stay as they are).
DEFAULT_ADAPTER = DistillConfig(method="lora", output="adapter", lora_r=8, lora_alpha=16.0,
                                lr=1e-3, batch_size=4, max_steps=60, zero_stage=2,
                                report_every=20, max_seq_len=512)


def adapter_config(**overrides) -> DistillConfig:
    """DEFAULT_ADAPTER with some fields changed (validated). Fields neither sets stay unset,
    so `on_gpu_pool` can still choose them."""
    return DistillConfig.model_validate({**DEFAULT_ADAPTER.model_dump(exclude_unset=True),
                                         **overrides})


def on_gpu_pool(cfg: DistillConfig) -> DistillConfig:
    """`cfg` for training beside a pool on GPUs (`PoolConfig.on_gpus`: a pool model has
    num_gpus > 0): use_gpu (one GPU per worker; Ray Train then runs NCCL) and bf16, each unless
    `cfg` set it itself."""
    update = {k: True for k in ("use_gpu", "bf16") if k not in cfg.model_fields_set}
    return cfg.model_copy(update=update) if update else cfg
