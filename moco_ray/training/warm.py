"""Warm trainers: one Ray Train run kept alive between trainings, as the pool keeps its engines.

A training that starts its own `TorchTrainer` pays for a worker group (actor processes, the
torch process group), the imports of torch, transformers, DeepSpeed, peft and TRL in those
workers, DeepSpeed's op load and the checkpoint handback through Ray Train's storage. On the
2-core CPU node a 2-step tiny LoRA adapter took 11.8 s that way and 0.44 s on a warm trainer
(after its first job, which pays the start once). Methods that train small adapters on dev data
(routers, defer tokens, per-agent SFT, DPO rounds) do so many times per sweep, so that start-up,
not the training, was their cost.

A `WarmTrainer` starts one `TorchTrainer` whose workers loop over a job board (a small Ray actor):
rank 0 takes the next job and broadcasts it to the other ranks, every rank runs the same worker
function the cold path uses (`train_worker`, `preference_worker`: the same loop, DeepSpeed
config and manifest), and rank 0 writes the checkpoint straight into the job's `out_dir` (on a
multi-node cluster that dir must be on storage every node sees, as the adapter dirs the pool
serves already must be). A job that fails on every rank (a bad row) is answered with its error
and the trainer goes on; a run that dies (a killed worker) fails the job in flight and the next
job starts a fresh run. A job that fails on some ranks only leaves the others waiting in a
collective until torch's process-group timeout ends the run.

    launch.keep_warm(True)   # this process's trainings use warm trainers, one per scaling setup
    TrainerService(warm=True)  # or: one service's trainings, on warm trainers of its own
    infos = distill_all(jobs, cfg)   # unchanged callers
    launch.keep_warm(False)  # stops them (also at exit)

A warm trainer trains one model at a time and holds its workers' resources while idle.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from moco_ray.config.distill import DistillConfig
from moco_ray.memory import release_memory
from moco_ray.models.checkpoint import CheckpointError, CheckpointInfo
from moco_ray.training.runs import (
    checkpoint_info,
    first_cause,
    job_failed,
    make_trainer,
    scratch_storage,
)

log = logging.getLogger(__name__)

STOP = "stop"
IDLE_TICK_S = 5.0  # rank 0 waits this long for a job before the ranks loop again


class _Board:
    """Jobs for a warm trainer's workers and their answers (an async Ray actor)."""

    def __init__(self):
        self._jobs: asyncio.Queue = asyncio.Queue()
        self._done: dict[str, asyncio.Event] = {}
        self._errors: dict[str, str | None] = {}

    async def put(self, job: Any, key: str | None = None) -> None:
        if key is not None:
            self._done[key] = asyncio.Event()
        await self._jobs.put(job)

    async def next(self, timeout: float) -> Any:
        try:
            return await asyncio.wait_for(self._jobs.get(), timeout)
        except TimeoutError:
            return None

    def done(self, key: str, error: str | None) -> None:
        self._errors[key] = error
        self._done[key].set()

    async def result(self, key: str, timeout: float) -> tuple[bool, str | None]:
        """(answered, error): (False, None) if no answer came within `timeout`."""
        try:
            await asyncio.wait_for(self._done[key].wait(), timeout)
        except TimeoutError:
            return False, None
        del self._done[key]
        return True, self._errors.pop(key)

    def drain(self) -> int:
        """Drop queued jobs (those of a run that died); returns how many."""
        n = 0
        while not self._jobs.empty():
            self._jobs.get_nowait()
            n += 1
        return n


def host_worker(config: dict[str, Any]) -> None:
    """Ray Train entry of a warm trainer: until told to stop, take the next job from the board
    (rank 0, then broadcast so every rank runs the same job), run `job["worker"](job)`, answer
    with its error or None (rank 0), and hand memory back."""
    import ray
    import ray.train
    import torch.distributed as dist

    board = config["board"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    while True:
        msg = [ray.get(board.next.remote(IDLE_TICK_S)) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(msg, src=0)
        job = msg[0]
        if job is None:
            continue
        if job == STOP:
            return
        error = None
        try:
            job["worker"](job)
        except Exception as e:
            log.exception("warm trainer: model %r failed", job["job"])
            error = job_failed(job, e)
        if rank == 0:
            ray.get(board.done.remote(job["key"], error))
        release_memory()


class WarmTrainer:
    """One long-lived Ray Train run (`cfg`'s workers, CPUs, GPU) that trains jobs one at a
    time; started on the first job, restarted on the next job after its run died."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self._board = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._storage: str | None = None
        self._lock = threading.Lock()
        self.runs = 0  # runs started (1 while it stays warm)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self) -> None:
        import ray

        if self._board is None:
            self._board = ray.remote(num_cpus=0)(_Board).remote()
        elif dropped := ray.get(self._board.drain.remote()):
            log.warning("warm trainer: dropped %d jobs of the run that ended", dropped)
        cfg = self.cfg
        self._storage = cfg.storage_path or scratch_storage("moco_warm_")
        trainer = make_trainer(host_worker, {"board": self._board}, cfg,
                               f"warm-trainer-{time.time_ns()}", self._storage)
        self._error = None

        def fit() -> None:
            try:
                trainer.fit()
            except Exception as e:  # noqa: BLE001 (read by the job waiting on it)
                self._error = e

        self._thread = threading.Thread(target=fit, name="warm-trainer", daemon=True)
        self._thread.start()
        self.runs += 1

    def train(self, model: str, out_dir: str, config: dict[str, Any], worker,
              rows: list[dict] | None = None) -> CheckpointInfo:
        """Train one model with `worker(job)` on the warm workers; `config` is the worker's
        config (the cold path's), `rows` its tokenized rows if it reads them from a dataset.
        Returns the verified checkpoint's info; raises naming the model if it failed."""
        import ray

        out = str(Path(out_dir).resolve())
        key = uuid.uuid4().hex
        job = {**config, "job": model, "key": key, "worker": worker, "out_dir": out}
        if rows is not None:
            job["rows"] = rows
        with self._lock:
            if not self.alive:
                self._start()
            t0 = time.perf_counter()
            ray.get(self._board.put.remote(job, key))
            while True:
                answered, error = ray.get(self._board.result.remote(key, 1.0))
                if answered:
                    break
                if not self.alive:
                    why = first_cause(self._error) if self._error else "it ended"
                    raise RuntimeError(f"model {model!r}: the warm trainer's run died while "
                                       f"training it: {why}")
        if error:
            raise RuntimeError(error)
        try:
            return checkpoint_info(model, out, time.perf_counter() - t0)
        except (CheckpointError, FileNotFoundError) as e:
            raise CheckpointError(f"model {model!r}: {e}; a warm trainer's rank 0 writes the "
                                  "checkpoint itself, so out_dir must be on storage every node "
                                  "sees") from e

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the run (its workers finish the job in hand first) and drop the board."""
        import ray

        if self.alive:
            ray.get(self._board.put.remote(STOP))
            self._thread.join(timeout_s)
        if self._board is not None:
            ray.kill(self._board)
            self._board = None
        if self.cfg.storage_path is None and self._storage:
            shutil.rmtree(self._storage, ignore_errors=True)


class WarmTrainers:
    """Warm trainers by scaling setup (workers, CPUs each, GPU, storage, custom resources), each
    started on its first job. A `TrainerService` holds its own set; `launch.keep_warm` holds the
    process's."""

    def __init__(self):
        self._hosts: dict[tuple, WarmTrainer] = {}
        self._lock = threading.Lock()
        self._closed = False

    def host(self, key: tuple, cfg: DistillConfig) -> WarmTrainer:
        with self._lock:
            if self._closed:
                raise RuntimeError("warm trainers were stopped while trainings were queued")
            if key not in self._hosts:
                self._hosts[key] = WarmTrainer(cfg)
            return self._hosts[key]

    def hosts(self) -> dict[tuple, WarmTrainer]:
        with self._lock:
            return dict(self._hosts)

    def close(self) -> None:
        """Stop every run (each finishes the job in hand first); later jobs are refused."""
        with self._lock:
            hosts, self._hosts, self._closed = self._hosts, {}, True
        for host in hosts.values():
            host.close()
