"""Saving a trained student as a checkpoint the pool can validate and load, and checking one.

A checkpoint dir is either a plain model dir (config.json, *.safetensors, tokenizer: what vLLM
and transformers load) or a peft adapter dir (adapter_config.json, adapter_model.safetensors),
plus `moco_checkpoint.json`: base model, method, steps, losses and the sha256 of every weight
file, so a loader can refuse a truncated or altered checkpoint before swapping it in.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "moco_checkpoint.json"
FORMAT = "moco_checkpoint/1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class CheckpointError(ValueError):
    """A checkpoint dir that is missing files or does not match its manifest."""


class CheckpointInfo(BaseModel):
    """One distilled model, as `distill_all` returns it."""

    model_config = ConfigDict(frozen=True)
    model: str = Field(description="model name from the job")
    path: str = Field(description="checkpoint dir (plain model dir or peft adapter dir)")
    base_model: str = Field(description="the model dir training started from")
    method: str
    output: str
    steps: int
    final_loss: float
    losses: list[float] = Field(description="global loss after every optimizer step")
    seconds: float = Field(description="wall time of this model's fit, driver side; in a run "
                           "that trains several models in turn, its share: from the previous "
                           "model's end (the run's start for the first) to its own end (the "
                           "run's end for the last)")
    train_entered: float = Field(description="epoch time rank 0 began (before reading its data, "
                                 "loading the model and DeepSpeed init)")
    train_started: float = Field(description="epoch time the first step began (rank 0)")
    train_finished: float = Field(description="epoch time the last step ended (rank 0)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    from moco_ray.distill.trainer import build_model

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


def write_manifest(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every weight file in `out` and write the manifest next to them."""
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir())
             if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)}
    if not files:
        raise CheckpointError(f"{out} has no weight files to put in the manifest")
    manifest = {"format": FORMAT, **info, "files": files,
                "created": datetime.now(UTC).isoformat(), "created_unix": time.time()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint dir after checking it: manifest present and readable, the
    files a loader needs present, every weight file's sha256 as recorded. CheckpointError else."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{root} has no {MANIFEST}; it was not written by moco_ray.distill "
                              "(or the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is damaged") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} has format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    needed = "adapter_config.json" if manifest.get("output") == "adapter" else "config.json"
    if not (root / needed).is_file():
        raise CheckpointError(f"{root} has no {needed}; a loader cannot open it")
    for name, digest in manifest.get("files", {}).items():
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"{root} lacks weight file {name} listed in its manifest")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f} does not match the sha256 in {MANIFEST}; the file was "
                                  "altered or truncated after saving")
    return manifest
