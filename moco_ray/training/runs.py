"""Pieces every Ray Train run shares, cold (`launch`) or warm (`warm`): the trainer, the error a
failed model reports, and the description of a saved checkpoint."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from moco_ray.config.distill import DistillConfig
from moco_ray.models.checkpoint import CheckpointInfo, verify_checkpoint

# A line of a formatted traceback naming an exception ("ValueError: row 3 ...").
_EXC_LINE = re.compile(r"^\s*([\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)


def first_cause(e: BaseException) -> str:
    """'Type: message' of the exception that started `e`'s chain. An error raised in another
    Ray process (a Ray Data UDF, say) arrives with its causes as traceback text only; Python
    prints a chain root first, so the first exception line there is the root."""
    root = e
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    m = _EXC_LINE.search(str(root))
    return f"{m[1]}: {m[2]}" if m else f"{type(root).__name__}: {root}"


def job_failed(job: dict[str, Any], e: BaseException) -> str:
    """What a worker says of a model that failed: its name and the first cause."""
    return f"model {job['job']!r} failed: {first_cause(e)}"


def make_trainer(train_fn, loop_config: dict, cfg: DistillConfig, name: str, storage: str,
                 datasets: dict | None = None, **run_kw):
    """A `TorchTrainer` over `cfg.num_workers` workers (gloo on CPU, NCCL on GPU); `run_kw` go
    to its RunConfig."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_fn, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **cfg.resources_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage, **run_kw), datasets=datasets)


def checkpoint_info(model: str, out_dir: str, seconds: float) -> CheckpointInfo:
    """Verify the checkpoint in `out_dir` and describe it."""
    manifest = verify_checkpoint(out_dir)
    return CheckpointInfo(
        model=model, path=str(Path(out_dir).resolve()), base_model=manifest["base_model"],
        method=manifest["method"], output=manifest["output"], steps=manifest["steps"],
        final_loss=manifest["final_loss"], losses=manifest["losses"], seconds=seconds,
        train_entered=manifest["train_entered"], train_started=manifest["train_started"],
        train_finished=manifest["train_finished"])


# A run's Ray Train storage (`<storage>/<run_name>/train`), set by workflows/storage.py.
TRAIN_STORAGE_ENV = "MOCO_RAY_TRAIN_STORAGE"


def scratch_storage(prefix: str) -> str:
    """A new storage dir of a run that has no `storage_path`: under $MOCO_RAY_TRAIN_STORAGE
    (`<storage>/<run_name>/train`, set by `moco-ray run` / `evolve`), else $MOCO_RAY_WORKDIR
    (storage every node sees, on a cluster; the job's runtime env carries both to every actor),
    else the system temp dir (one machine). The run removes it once its checkpoints are out."""
    return tempfile.mkdtemp(prefix=prefix,
                            dir=env_dir(TRAIN_STORAGE_ENV, "MOCO_RAY_WORKDIR"))


def env_dir(*names: str) -> str | None:
    """The dir the first set env var of `names` names, created if missing; None if none is set
    (the caller then uses the system temp dir)."""
    root = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if root:
        os.makedirs(root, exist_ok=True)
    return root
