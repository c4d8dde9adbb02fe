"""Distillation: Ray Train + DeepSpeed, LoRA or full fine-tuning, SFT plus top-k logit KD.

    from moco_ray.config import DistillConfig
    from moco_ray.training import distill_all
    infos = distill_all([(name, base_dir, rows_or_dataset, out_dir), ...], DistillConfig(...))

Every model trains at the same time, one TorchTrainer each (or `runs=k`: packed into k runs that
train their models in turn); each returns a checkpoint dir with a `moco_checkpoint.json` manifest
that `verify_checkpoint` checks before the pool swaps it in. `keep_warm(True)` sends this
process's trainings to long-lived Ray Train runs instead (`moco_ray.training.warm`).
"""
from moco_ray.config.distill import DistillConfig
from moco_ray.models.checkpoint import MANIFEST, CheckpointError, CheckpointInfo, verify_checkpoint
from moco_ray.training.data import tokenize_row, tokenize_rows
from moco_ray.training.launch import DistillJob, distill_all, distill_local, keep_warm

__all__ = ["MANIFEST", "CheckpointError", "CheckpointInfo", "DistillConfig", "DistillJob",
           "distill_all", "distill_local", "keep_warm", "tokenize_row", "tokenize_rows",
           "verify_checkpoint"]
