"""Driver side: check every job, then distill all models, in Ray Train runs.

By default each model gets its own `TorchTrainer`; each blocking `fit()` runs in a driver thread,
so all runs are in flight together and Ray places their workers as the cluster's resources allow
(a run that does not fit yet waits for its placement group, it does not fail). Where trainers
must queue anyway (a capped node), `runs=k` packs the models into k runs that each train their
models one after another in the same workers: one worker-group start, one import and one
handback per run instead of per model.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from moco_ray.config.distill import DistillConfig
from moco_ray.memory import release_memory
from moco_ray.models.checkpoint import CheckpointInfo
from moco_ray.training.checkpoint import save_checkpoint
from moco_ray.training.data import TokenizeFn, plain, tokenize_rows
from moco_ray.training.runs import checkpoint_info, job_failed, make_trainer, scratch_storage
from moco_ray.training.trainer import (
    RUN_PROGRESS,
    read_resume_step,
    read_run_progress,
    release_engine,
    run_training,
    train_worker,
)
from moco_ray.training.warm import WarmTrainers

log = logging.getLogger(__name__)


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
                                "config.json; pass a local model dir (e.g. models.resolve_path)")
    out = Path(job.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"job {job.model!r}: out_dir {str(out)!r} is not empty; "
                              "fix: pick a new dir or delete the old checkpoint")


def prepare(job: DistillJob, cfg: DistillConfig):
    """Tokenized rows: a list for a list (checked here on the driver, errors name the row
    index), a lazily tokenized Ray Dataset for a Ray Dataset."""
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
    return rows


def check_distinct(jobs, what: str) -> None:
    """Every job has its own name and its own out_dir."""
    names = [j.model for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate {what} names {dup}; each job needs its own name")
    outs = [str(Path(j.out_dir).resolve()) for j in jobs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"two jobs share an out_dir ({outs}); give each {what} its own")


class Planned(NamedTuple):
    """One model of a Ray Train run: its job (`.model`, `.out_dir`), its settings, the worker's
    config for it, and the tokenized rows its worker reads as its shard (a list or a Ray
    Dataset; None: the rows are in the config)."""

    job: Any
    cfg: DistillConfig
    config: dict
    dataset: Any = None


def _scaling(cfg: DistillConfig) -> tuple:
    return (cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, cfg.storage_path,
            tuple(sorted(cfg.resources_per_worker.items())))


def pack(planned: list[Planned], runs: int | None) -> list[list[Planned]]:
    """Split the models into Ray Train runs: None gives every model its own run (all in flight
    at once); `runs=k` gives at most k runs per scaling setup (workers, CPUs, GPU, storage,
    custom resources), the models dealt round-robin, each run training its models one after
    another. Models with different scaling never share a run (one run has one worker group)."""
    if runs is None:
        return [[p] for p in planned]
    if runs < 1:
        raise ValueError(f"runs={runs} must be >= 1 or None")
    by_scaling: dict[tuple, list[Planned]] = {}
    for p in planned:
        by_scaling.setdefault(_scaling(p.cfg), []).append(p)
    return [same[i::runs] for same in by_scaling.values() for i in range(min(runs, len(same)))]


def _restart_point() -> tuple[list[str], str | None, str | None]:
    """Where a restarted run (FailureConfig) picks up: (models already done, the model in
    progress at its last resume checkpoint, a local copy of that checkpoint); a first attempt
    gets ([], None, None)."""
    import tempfile

    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return [], None, None
    with ckpt.as_directory() as d:
        progress = read_run_progress(d)
    if progress is None:  # a worker that writes no progress (DPO, GRPO): start over
        return [], None, None
    if progress["final"]:
        return progress["done"], None, None
    local = tempfile.mkdtemp(prefix="moco_resume_")
    ckpt.to_directory(local)
    log.warning("run restarted: %d model(s) already done, %r resumes from step %s",
                len(progress["done"]), progress["job"], read_resume_step(local))
    return progress["done"], progress["job"], local


def in_turn_worker(config: dict[str, Any]) -> None:
    """Ray Train entry of a run that trains several models: `config["worker"](job)` for each of
    `config["jobs"]` in turn, in the same worker processes (one worker-group start, imports and
    the DeepSpeed op loaded once); memory is handed back between models. After a restart (a
    worker died; `DistillConfig.max_failures`) the models the run had finished are skipped and
    the one in progress continues from its last resume checkpoint, if it wrote one."""
    done, resuming, resume_dir = _restart_point()
    try:
        for i, job in enumerate(config["jobs"]):
            if job["job"] in done:
                continue
            if i:
                release_memory()
            log.info("run model %d/%d: %s", i + 1, len(config["jobs"]), job["job"])
            job = {**job, "done_before": list(done),
                   "resume_dir": resume_dir if job["job"] == resuming else None}
            try:
                config["worker"](job)
            except Exception as e:
                # Ray shows the head and tail of a worker's traceback: end it with the model's
                # name and the first cause (a bad row, a missing file), not a wrapper's message.
                raise RuntimeError(job_failed(job, e)) from e
            done.append(job["job"])
    finally:
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)


def _saved_result(storage: str, name: str):
    """The checkpoints a failed run had already saved (None if it saved none)."""
    from ray.train import Result

    try:
        return Result.from_path(f"{storage.rstrip('/')}/{name}")
    except RuntimeError:  # nothing reached storage
        return None


def _one_run(train_fn, group: list[Planned], what: str
             ) -> tuple[dict[str, CheckpointInfo], BaseException | None]:
    """One `TorchTrainer` (`make_trainer`) training the group's models in turn. Each checkpoint
    is copied to its job's out_dir and verified. Returns
    ({model: info} of the models that finished, the run's error or None)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig

    cfg = group[0].cfg
    configs, datasets = [], {}
    for i, p in enumerate(group):
        config = {**p.config, "job": p.job.model}
        if p.dataset is not None:
            config["dataset"] = f"train_{i}"
            datasets[config["dataset"]] = (p.dataset if _is_dataset(p.dataset)
                                           else ray.data.from_items(p.dataset))
        configs.append(config)
    storage = cfg.storage_path or scratch_storage(f"moco_{what}_")
    name = f"{what}-{group[0].job.model}-{time.time_ns()}"
    trainer = make_trainer(in_turn_worker, {"worker": train_fn, "jobs": configs}, cfg, name,
                           storage, checkpoint_config=CheckpointConfig(num_to_keep=None),
                           failure_config=FailureConfig(max_failures=cfg.max_failures),
                           datasets=datasets or None)
    t0 = time.time()
    error: BaseException | None = None
    infos: dict[str, CheckpointInfo] = {}
    try:
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 (returned: the models done before it are kept)
            error, result = e, _saved_result(storage, name)
        t1 = time.time()
        # A model's final checkpoint (resume checkpoints carry "resume_step"); a model a
        # restarted run trained again has its last.
        saved = {m.get("job"): (c, m) for c, m in (result.best_checkpoints or [])
                 if m.get("resume_step") is None} if result else {}
        prev = t0
        for p in group:
            if p.job.model not in saved:
                continue
            ckpt, metrics = saved[p.job.model]
            ckpt.to_directory(p.job.out_dir)
            (Path(p.job.out_dir) / RUN_PROGRESS).unlink(missing_ok=True)
            info = checkpoint_info(p.job.model, p.job.out_dir, 0.0)
            info = info.model_copy(update={"resumed_from": metrics.get("resumed_from")})
            # Each model's share of the run: from the previous model's end (the run's start for
            # the first) to its own (the run's end for the last; handback included).
            end = t1 if p is group[-1] else info.train_finished
            infos[p.job.model] = info.model_copy(update={"seconds": max(end - prev, 0.0)})
            prev = info.train_finished
    finally:
        if cfg.storage_path is None:
            shutil.rmtree(storage, ignore_errors=True)  # our own temp dir: the copies are out
    return infos, error


def fit_in_turn(train_fn, group: list[Planned], what: str
                ) -> dict[str, CheckpointInfo | BaseException]:
    """Train the group's models one after another in one Ray Train run. A model that fails ends
    that run: the models before it keep their checkpoints, it gets the error, and the models
    after it go on in a fresh run."""
    out: dict[str, CheckpointInfo | BaseException] = {}
    remaining = list(group)
    while remaining:
        try:
            infos, error = _one_run(train_fn, remaining, what)
        except Exception as e:  # noqa: BLE001 (the trainer could not be set up)
            infos, error = {}, e
        out.update(infos)
        missing = [p for p in remaining if p.job.model not in infos]
        if not missing:
            break
        if error is None:
            for p in missing:
                out[p.job.model] = RuntimeError(
                    f"job {p.job.model!r}: the {what} run ended without its checkpoint")
            break
        out[missing[0].job.model] = error  # models train in order: the first missing failed
        remaining = missing[1:]
    return out


# The process's warm trainers (`keep_warm`); None: a training without warm trainers of its own
# (a `warm=` argument) starts its own run.
_WARM: WarmTrainers | None = None
_WARM_LOCK = threading.Lock()


def keep_warm(on: bool) -> None:
    """Route this process's trainings (distill_all, dpo_train_adapters, grpo_train_adapter) to
    warm trainers, one long-lived Ray Train run per scaling setup (see `moco_ray.training.warm`),
    or stop them (`False`; also done at exit). A call given `warm=` uses those instead."""
    global _WARM
    with _WARM_LOCK:
        if on and _WARM is not None:
            return  # already on: keep the trainers that are up
        old, _WARM = _WARM, (WarmTrainers() if on else None)
    if old is not None:
        old.close()
    if on:
        atexit.unregister(_stop_warm)
        atexit.register(_stop_warm)


def _stop_warm() -> None:
    keep_warm(False)


@contextlib.contextmanager
def cold():
    """Trainings started in this block (from any thread) without `warm=` each start their own
    run, as without `keep_warm`; the warm trainers stay up for after it."""
    global _WARM
    with _WARM_LOCK:
        hosts, _WARM = _WARM, None
    try:
        yield
    finally:
        with _WARM_LOCK:
            _WARM = hosts


def warm_trainers() -> dict[tuple, Any]:
    """The process's warm trainers started so far, by (workers, CPUs each, GPU, storage)."""
    return _WARM.hosts() if _WARM is not None else {}


def fit_warm(train_fn, group: list[Planned], warm: WarmTrainers
             ) -> dict[str, CheckpointInfo | BaseException]:
    """The group's models one after another on the warm trainer of their scaling setup."""
    out: dict[str, CheckpointInfo | BaseException] = {}
    for p in group:
        host = warm.host(_scaling(p.cfg), p.cfg)
        try:
            rows = p.dataset
            if rows is not None and _is_dataset(rows):  # its rows travel with the job
                rows = [plain(r) for r in rows.iter_rows()]
            out[p.job.model] = host.train(p.job.model, p.job.out_dir, p.config, train_fn, rows)
        except Exception as e:  # noqa: BLE001 (reported with the others' results)
            out[p.job.model] = e
    return out


def train_packed(planned: list[Planned], train_fn, what: str, runs: int | None = None,
                 warm: WarmTrainers | None = None) -> dict[str, CheckpointInfo]:
    """Train every planned model: the runs of `pack(planned, runs)` all at once, each from its
    own driver thread (Ray places their workers as resources allow; a run that does not fit yet
    waits for its placement group); with `warm` (else the process's, under `keep_warm(True)`)
    each group goes to the warm trainer of its scaling setup instead. Returns {model: info} in the given order. If some fail, the
    others still finish and one error names every failed model."""
    results: dict[str, CheckpointInfo] = {}
    errors: dict[str, BaseException] = {}
    lock = threading.Lock()

    warm = warm or _WARM

    def run(group: list[Planned]) -> None:
        got = fit_warm(train_fn, group, warm) if warm else fit_in_turn(train_fn, group, what)
        with lock:
            for name, value in got.items():
                if isinstance(value, BaseException):
                    errors[name] = value
                else:
                    results[name] = value

    groups = pack(planned, runs)
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix=what) as pool:
        list(pool.map(run, groups))
    if errors:
        first = next(iter(errors.values()))
        raise RuntimeError(f"{what} training failed for " + ", ".join(
            f"{m}: {type(e).__name__}: {e}" for m, e in errors.items())) from first
    return {p.job.model: results[p.job.model] for p in planned}


def distill_all(jobs: list[tuple] | list[DistillJob], cfg: DistillConfig,
                runs: int | None = None, warm: WarmTrainers | None = None
                ) -> dict[str, CheckpointInfo]:
    """Distill every job's model and return {model: CheckpointInfo}. Jobs are (model,
    base_model_dir, rows_or_dataset, out_dir[, cfg]) tuples or DistillJobs. By default each model
    has its own TorchTrainer and all run at once; `runs=k` packs them into at most k runs that
    train their models in turn (see `pack`: fewer worker-group starts where trainers must
    queue anyway); `warm`: train on these warm trainers (see `train_packed`). Every job is
    checked before any starts; if some fail, the others still
    finish and one error names every failed model."""
    preload_imports()
    jobs = [DistillJob(*j) for j in jobs]
    check_distinct(jobs, "model")
    jobs = [j._replace(cfg=j.cfg or cfg) for j in jobs]
    planned = [Planned(j, j.cfg, {"cfg": j.cfg.model_dump(mode="json"), "model_name": j.model,
                                  "base_model_dir": str(Path(j.base_model_dir).resolve())},
                       prepare(j, j.cfg)) for j in jobs]
    return train_packed(planned, train_worker, "distill", runs, warm)


def distill_local(model: str, base_model_dir: str, rows: list[dict], out_dir: str,
                  cfg: DistillConfig) -> CheckpointInfo:
    """One model in this process on one rank (no Ray): the same loop and checkpoint as a
    worker. For debugging and quick checks; `cfg.num_workers` must be 1."""
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
    release_engine(state.engine)
    return checkpoint_info(model, out_dir, time.perf_counter() - t0)
