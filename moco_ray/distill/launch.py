"""Driver side: check every job, then distill all models at once, one Ray Train run per model.

Each model gets its own `TorchTrainer`; its blocking `fit()` runs in a driver thread, so all runs
are in flight together and Ray places their workers as the cluster's resources allow (a run that
does not fit yet waits for its placement group, it does not fail).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from moco_ray.distill.checkpoint import CheckpointInfo, save_checkpoint, verify_checkpoint
from moco_ray.distill.config import DistillConfig
from moco_ray.distill.data import TokenizeFn, tokenize_rows


class DistillJob(NamedTuple):
    """One model to distill: its name, the dir it starts from, its SFT rows, where to save, and
    optionally its own settings (else the `cfg` given to `distill_all`)."""

    model: str
    base_model_dir: str
    data: Any  # list of row dicts, or a ray.data.Dataset of them
    out_dir: str
    cfg: DistillConfig | None = None


_IMPORTS = threading.Lock()


def preload_imports() -> None:
    """Import what the driver side of a training needs, one thread at a time. transformers and
    TRL resolve names lazily, and two threads resolving the same name at once can fail with
    "cannot import name 'AutoTokenizer' from 'transformers'" (seen with several adapter
    trainings starting together in the coordinator). Cheap once done."""
    with _IMPORTS:
        import peft
        import ray.train.torch
        import transformers
        import trl

        for mod, names in ((transformers, ("AutoTokenizer", "AutoModelForCausalLM",
                                           "TrainerCallback")),
                           (trl, ("DPOConfig", "GRPOConfig", "DPOTrainer", "GRPOTrainer")),
                           (peft, ("LoraConfig", "PeftModel")),
                           (ray.train.torch, ("TorchConfig", "TorchTrainer"))):
            for name in names:
                getattr(mod, name)


def _is_dataset(data: Any) -> bool:
    import ray.data

    return isinstance(data, ray.data.Dataset)


def _check_dirs(job: DistillJob) -> None:
    base = Path(job.base_model_dir)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"job {job.model!r}: base_model_dir {str(base)!r} has no "
                                "config.json; pass a local model dir (e.g. zoo.resolve_path)")
    out = Path(job.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"job {job.model!r}: out_dir {str(out)!r} is not empty; "
                              "fix: pick a new dir or delete the old checkpoint")


def prepare(job: DistillJob, cfg: DistillConfig):
    """A Ray Dataset of tokenized rows. Lists are checked here on the driver (errors name the
    row index); a Ray Dataset is tokenized lazily by Ray Data."""
    import ray.data
    from transformers import AutoTokenizer

    _check_dirs(job)
    tokenizer = AutoTokenizer.from_pretrained(job.base_model_dir)
    if _is_dataset(job.data):
        return job.data.map(TokenizeFn(tokenizer, cfg.max_seq_len))
    rows = tokenize_rows(job.data, tokenizer, cfg.max_seq_len)
    if len(rows) < cfg.rows_per_step:
        raise ValueError(f"job {job.model!r}: {len(rows)} rows cannot fill one optimizer step "
                         f"of batch_size * grad_accum * num_workers = {cfg.rows_per_step}; "
                         "fix: add rows or lower those settings")
    return ray.data.from_items(rows)


def check_distinct(jobs, what: str) -> None:
    """Every job has its own name and its own out_dir."""
    names = [j.model for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate {what} names {dup}; each job needs its own name")
    outs = [str(Path(j.out_dir).resolve()) for j in jobs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"two jobs share an out_dir ({outs}); give each {what} its own")


def fit_to_dir(train_fn, loop_config: dict, model: str, out_dir: str, cfg: DistillConfig,
               run_name: str, datasets: dict | None = None) -> CheckpointInfo:
    """One Ray Train run (`TorchTrainer` over `cfg.num_workers` workers, gloo on CPU, NCCL on
    GPU); its checkpoint is copied to `out_dir` and verified."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = cfg.storage_path or tempfile.mkdtemp(prefix=f"moco_{run_name}_")
    trainer = TorchTrainer(
        train_fn, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=f"{run_name}-{time.time_ns()}", storage_path=storage),
        datasets=datasets)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"job {model!r}: {run_name} ended without a checkpoint")
        result.checkpoint.to_directory(out_dir)
    finally:
        if cfg.storage_path is None:
            shutil.rmtree(storage, ignore_errors=True)  # our own temp dir: the copy is out
    return checkpoint_info(model, out_dir, seconds)


def checkpoint_info(model: str, out_dir: str, seconds: float) -> CheckpointInfo:
    """Verify the checkpoint in `out_dir` and describe it."""
    manifest = verify_checkpoint(out_dir)
    return CheckpointInfo(
        model=model, path=str(Path(out_dir).resolve()), base_model=manifest["base_model"],
        method=manifest["method"], output=manifest["output"], steps=manifest["steps"],
        final_loss=manifest["final_loss"], losses=manifest["losses"], seconds=seconds,
        train_entered=manifest["train_entered"], train_started=manifest["train_started"],
        train_finished=manifest["train_finished"])


def run_parallel(jobs: list, fit: Callable[[Any], CheckpointInfo],
                 what: str) -> dict[str, CheckpointInfo]:
    """`fit(job)` for every job at once, each from its own driver thread; {job.model: info}.
    If some fail, the others still finish and one error names every failed job."""
    results: dict[str, CheckpointInfo] = {}
    errors: dict[str, BaseException] = {}
    lock = threading.Lock()

    def run(job) -> None:
        try:
            info = fit(job)
        except Exception as e:  # noqa: BLE001 (kept, re-raised below once the others finish)
            with lock:
                errors[job.model] = e
            return
        with lock:
            results[job.model] = info

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix=what) as pool:
        list(pool.map(run, jobs))
    if errors:
        first = next(iter(errors.values()))
        raise RuntimeError(f"{what} failed for " + ", ".join(
            f"{m}: {type(e).__name__}: {e}" for m, e in errors.items())) from first
    return {j.model: results[j.model] for j in jobs}


def distill_all(jobs: list[tuple] | list[DistillJob],
                cfg: DistillConfig) -> dict[str, CheckpointInfo]:
    """Distill every job's model at the same time (one TorchTrainer each, launched from its own
    driver thread) and return {model: CheckpointInfo}. Jobs are (model, base_model_dir,
    rows_or_dataset, out_dir[, cfg]) tuples or DistillJobs. Every job is checked before any
    starts; if some fail, the others still finish and one error names every failed model."""
    from moco_ray.distill.trainer import train_worker

    preload_imports()
    jobs = [DistillJob(*j) for j in jobs]
    check_distinct(jobs, "model")
    jobs = [j._replace(cfg=j.cfg or cfg) for j in jobs]
    datasets = {j.model: prepare(j, j.cfg) for j in jobs}

    def fit(job: DistillJob) -> CheckpointInfo:
        config = {"cfg": job.cfg.model_dump(mode="json"), "model_name": job.model,
                  "base_model_dir": str(Path(job.base_model_dir).resolve())}
        return fit_to_dir(train_worker, config, job.model, job.out_dir, job.cfg,
                          f"distill-{job.model}", datasets={"train": datasets[job.model]})

    return run_parallel(jobs, fit, "distillation")


def distill_local(model: str, base_model_dir: str, rows: list[dict], out_dir: str,
                  cfg: DistillConfig) -> CheckpointInfo:
    """One model in this process on one rank (no Ray): the same loop and checkpoint as a
    worker. For debugging and quick checks; `cfg.num_workers` must be 1."""
    from moco_ray.distill.trainer import run_training

    if cfg.num_workers != 1:
        raise ValueError(f"distill_local runs one rank; num_workers={cfg.num_workers}; "
                         "fix: use distill_all for more workers")
    job = DistillJob(model, base_model_dir, rows, out_dir)
    _check_dirs(job)
    from transformers import AutoTokenizer

    tokenized = tokenize_rows(rows, AutoTokenizer.from_pretrained(base_model_dir),
                              cfg.max_seq_len)
    t0 = time.perf_counter()
    state = run_training(cfg, base_model_dir, tokenized)
    save_checkpoint(state, cfg, base_model_dir, model, out_dir)
    return checkpoint_info(model, out_dir, time.perf_counter() - t0)
