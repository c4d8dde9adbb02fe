"""How a strategy trains: through the trainer its context carries (`ctx.trainer`, the
`Trainer` protocol of base.py; the coordinator gives every job `moco_ray.training.service`'s
`TrainerService`). Rows are chat SFT rows, `{"messages": [...]}` with the loss on the assistant
turns only; only dev data may reach them (callers build rows inside `fit`).

    paths = await train_adapters(ctx, {"router": ("m1", rows)}, adapter_config(max_steps=50))
    gens = await ectx.generate_lora("m1", paths["router"], prompt, params)

These are module functions so that unit tests can stand in for training by replacing them.
"""
from __future__ import annotations

from moco_ray.config.distill import DEFAULT_ADAPTER, DistillConfig, GRPOSettings, adapter_config
from moco_ray.strategies.base import StrategyContext

__all__ = ["DEFAULT_ADAPTER", "adapter_config", "train_adapters", "train_dpo", "train_grpo"]


async def train_adapters(ctx: StrategyContext, jobs: dict[str, tuple[str, list[dict]]],
                         cfg: DistillConfig | None = None) -> dict[str, str]:
    """One LoRA SFT adapter per `{name: (pool_model, rows)}`; returns `{name: adapter_dir}`.
    Training time is charged to the job's cost as `train:<name>`."""
    return await ctx.trainer.train_adapters(ctx, jobs, cfg)


async def train_dpo(ctx: StrategyContext, jobs: dict[str, tuple[str, list[dict], str | None]],
                    cfg: DistillConfig, beta: float) -> dict[str, str]:
    """One DPO adapter per `{name: (pool_model, pairs, init_adapter)}`, all at once."""
    return await ctx.trainer.train_dpo(ctx, jobs, cfg, beta)


async def train_grpo(ctx: StrategyContext, name: str, model: str, rows: list[dict], reward,
                     cfg: DistillConfig, settings: GRPOSettings) -> str:
    """One GRPO adapter of pool model `model`; returns its dir."""
    return await ctx.trainer.train_grpo(ctx, name, model, rows, reward, cfg, settings)
