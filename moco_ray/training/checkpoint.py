"""Saving a trained student as a checkpoint the pool can validate and load (the format and its
checks live in `moco_ray.models.checkpoint`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from moco_ray.models.checkpoint import write_manifest
from moco_ray.training.model import build_model


def _full_state_dict(module, zero_stage: int, rank: int) -> dict[str, Any] | None:
    """ZeRO-3 shards every weight: gather each one on all ranks in turn (a collective, one
    parameter at a time to bound memory) and keep a CPU copy on rank 0."""
    import deepspeed

    state: dict[str, Any] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None,
                                               enabled=zero_stage == 3):
            if rank == 0:
                state[name] = p.detach().to("cpu", copy=True)
    return state if rank == 0 else None


def _unsharded_module(engine, cfg, base_model_dir: str, rank: int):
    """Rank 0's full model: the engine's own module, or for ZeRO-3 a fresh copy with the
    gathered weights loaded (the engine's module holds only this rank's shards)."""
    if cfg.zero_stage != 3:
        return engine.module if rank == 0 else None
    state = _full_state_dict(engine.module, 3, rank)
    if rank != 0:
        return None
    fresh = build_model(cfg, base_model_dir)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    buffers = {n for n, _ in fresh.named_buffers()}
    assert not unexpected and set(missing) <= buffers, (missing, unexpected)
    return fresh


def save_checkpoint(state, cfg, base_model_dir: str, model_name: str,
                    out_dir: str | None) -> dict | None:
    """Write the checkpoint into `out_dir` on rank 0 (other ranks pass None but must call this:
    ZeRO-3 gathers the weights collectively). Returns the manifest on rank 0."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    module = _unsharded_module(state.engine, cfg, base_model_dir, rank)
    if rank != 0:
        return None
    assert out_dir is not None, "rank 0 needs an out_dir"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.method == "lora" and cfg.output == "adapter":
        module.save_pretrained(str(out))  # peft: adapter_config.json + adapter_model.safetensors
    else:
        if cfg.method == "lora":
            module = module.merge_and_unload()  # fold B @ A * alpha / r into the base weights
        module.config.use_cache = True  # back to inference defaults
        module.save_pretrained(str(out))
    state.tokenizer.save_pretrained(str(out))
    return write_manifest(out, {
        "model": model_name, "base_model": str(base_model_dir), "method": cfg.method,
        "output": cfg.output, "zero_stage": cfg.zero_stage, "steps": len(state.losses),
        "final_loss": state.losses[-1] if state.losses else None, "losses": state.losses,
        "train_entered": state.entered, "train_started": state.started,
        "train_finished": state.finished,
        "config": cfg.model_dump(mode="json")})


