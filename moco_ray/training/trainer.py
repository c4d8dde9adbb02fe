"""The training loop that runs in every Ray Train worker (or in-process for one rank).

Per optimizer step each rank takes `batch_size * grad_accum` of its rows, all ranks agree on the
step's token counts first (one all-reduce), and every micro-batch's loss is its summed loss over
those global counts. DeepSpeed then averages gradients over ranks, so the update equals the
token-mean loss of the whole step, however it is cut into micro-batches and workers.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moco_ray.config.distill import DistillConfig, deepspeed_config
from moco_ray.training.checkpoint import save_checkpoint
from moco_ray.training.data import IGNORE, collate, plain
from moco_ray.training.loss import kd_sum, sft_sum
from moco_ray.training.model import build_model
from moco_ray.training.runs import TRAIN_STORAGE_ENV, env_dir

log = logging.getLogger(__name__)

StepHook = Callable[[dict[str, Any]], None]


def release_engine(engine) -> None:
    """Free a DeepSpeed engine's model and optimizer now. Its hooks keep it reachable after the
    loop returns: without this, every model trained in one process (a run training several in
    turn, a warm trainer) stayed in memory, ~0.55 GB more per SmolLM2-135M adapter."""
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()


@dataclass
class TrainState:
    """What a finished loop hands to checkpointing (on every rank)."""

    engine: Any
    tokenizer: Any
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None  # steps a resume checkpoint had done (None: from step 0)
    entered: float = 0.0  # the loop was called (model load and DeepSpeed init follow)
    started: float = 0.0  # first step began
    finished: float = 0.0  # last step ended


# A JIT op build that was killed midway (an OOM kill, a preempted node) leaves its lock file, and
# torch then waits for it forever; no build takes this long, so an older lock is a dead one.
STALE_OP_LOCK_S = 20 * 60


def op_cache_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops (the CPU comm op) are built and kept:
    $TORCH_EXTENSIONS_DIR, else `torch_extensions/` inside this Python environment. One shared
    ~/.cache dir made two environments recompile each other's build on every switch."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path(sys.prefix) / "torch_extensions"


def prepare_op_cache(stale_after_s: float = STALE_OP_LOCK_S) -> Path:
    """Point torch's extension builds at `op_cache_dir()` and drop build locks older than
    `stale_after_s` (left by a killed build; they would hang every later training)."""
    root = op_cache_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    now = time.time()
    for lock in root.glob("*/lock") if root.is_dir() else []:
        try:
            if now - lock.stat().st_mtime > stale_after_s:
                lock.unlink()
                log.warning("removed a stale op build lock %s (its build was killed)", lock)
        except FileNotFoundError:
            pass
    return root


def ensure_process_group() -> None:
    """Ray Train sets up torch.distributed in its workers; a plain process gets a one-rank gloo
    group (kept for the process's life, so later runs reuse it). Prepares the op cache first."""
    prepare_op_cache()
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _all_reduce(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few numbers across ranks (on `device`: NCCL reduces GPU tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _step_plan(cfg: DistillConfig, n_local: int, world: int, device) -> tuple[int, int]:
    """(rows each rank uses per epoch, total optimizer steps); every rank gets the same."""
    # Shards may differ by a row or two: every rank plans with the smallest.
    n = int(_all_reduce([n_local], device, op=dist.ReduceOp.MIN)[0])
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = n // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n * world} rows cannot fill one optimizer step of batch_size * grad_accum * "
            f"num_workers = {per_step * world} rows; fix: add rows or lower batch_size, "
            "grad_accum or num_workers")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    return steps_per_epoch * per_step, total


# A resume checkpoint: DeepSpeed's engine checkpoint under this tag, the loop's position (rank 0)
# and every rank's RNG state (LoRA dropout draws), so a resumed run takes the steps an unbroken
# one would have taken.
RESUME_TAG = "resume"
RESUME_STATE = "moco_resume.json"


def _rng_file(rank: int) -> str:
    return f"moco_rng_rank{rank}.pt"


def save_resume_point(engine, out_dir: str, step: int, losses: list[float]) -> None:
    """Write a resume checkpoint of the loop after `step` optimizer steps into `out_dir`
    (collective: every rank calls it and writes its own shard and RNG state)."""
    engine.save_checkpoint(out_dir, tag=RESUME_TAG)
    rank = dist.get_rank()
    torch.save(torch.get_rng_state(), Path(out_dir) / _rng_file(rank))
    if rank == 0:
        (Path(out_dir) / RESUME_STATE).write_text(json.dumps({"step": step, "losses": losses}))


def read_resume_step(resume_dir: str) -> int | None:
    """Steps a resume checkpoint had done (None when the dir holds none)."""
    path = Path(resume_dir) / RESUME_STATE
    return int(json.loads(path.read_text())["step"]) if path.is_file() else None


def load_resume_point(engine, resume_dir: str) -> tuple[int, list[float]]:
    """Restore a `save_resume_point` checkpoint into `engine`; returns (steps done, losses)."""
    path, _ = engine.load_checkpoint(resume_dir, tag=RESUME_TAG)
    if path is None:
        raise RuntimeError(f"resume checkpoint in {resume_dir} could not be loaded (DeepSpeed "
                           f"found no '{RESUME_TAG}' checkpoint there)")
    rng = Path(resume_dir) / _rng_file(dist.get_rank())
    if rng.is_file():
        torch.set_rng_state(torch.load(rng))
    state = json.loads((Path(resume_dir) / RESUME_STATE).read_text())
    return int(state["step"]), [float(x) for x in state["losses"]]


# (steps done, state) -> None: called on every rank after every `checkpoint_every` steps.
CheckpointHook = Callable[[int, "TrainState"], None]


def run_training(cfg: DistillConfig, base_model_dir: str, rows: list[dict],
                 on_step: StepHook | None = None, on_checkpoint: CheckpointHook | None = None,
                 resume_dir: str | None = None) -> TrainState:
    """Train on this rank's tokenized rows (see data.tokenize_row); call `on_step(metrics)` after
    every optimizer step with the step's global loss, and `on_checkpoint(step, state)` after
    every `cfg.checkpoint_every` steps but the last. `resume_dir`: a `save_resume_point`
    checkpoint to continue from. Collective: every rank must call it."""
    entered = time.time()
    import deepspeed
    from transformers import AutoTokenizer

    deepspeed.utils.logger.setLevel(logging.WARNING)
    ensure_process_group()
    world = dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(cfg.seed)  # same adapter init on every rank
    model = build_model(cfg, base_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                      config=deepspeed_config(cfg, world))
    engine.train()
    device = engine.device

    # Arrival order of a Ray Data shard varies; sort so a seed fixes the run.
    rows = sorted(rows, key=lambda r: (r["idx"], r["input_ids"]))
    used, total = _step_plan(cfg, len(rows), world, device)
    per_step = cfg.batch_size * cfg.grad_accum
    state = TrainState(engine=engine, tokenizer=tokenizer, entered=entered, started=time.time())
    first = 0
    if resume_dir is not None:
        first, state.losses = load_resume_point(engine, resume_dir)
        state.resumed_from = first
    order: list[int] = []
    for step in range(first, total):
        epoch, within = divmod(step, used // per_step)
        if within == 0 or step == first:  # an epoch's order is a function of (seed, epoch)
            gen = torch.Generator().manual_seed(cfg.seed + epoch)
            order = torch.randperm(len(rows), generator=gen)[:used].tolist()
        picked = [rows[i] for i in order[within * per_step:(within + 1) * per_step]]
        micro = [collate(picked[i:i + cfg.batch_size], pad_id)
                 for i in range(0, per_step, cfg.batch_size)]
        counts = _all_reduce([sum(int((m["labels"][:, 1:] != IGNORE).sum()) for m in micro),
                           sum(int(m["kd_pos"].numel()) for m in micro)], device)
        n_tok, n_kd = max(counts[0], 1.0), max(counts[1], 1.0)
        sums = [0.0, 0.0]
        for m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            logits = engine(input_ids=m["input_ids"], attention_mask=m["attention_mask"]).logits
            sft, _ = sft_sum(logits, m["labels"])
            kd, _ = kd_sum(logits, m, cfg.kd_temperature)
            # Times `world`: DeepSpeed averages gradients over ranks, we want their sum.
            loss = (sft / n_tok + cfg.kd_weight * kd / n_kd) * world
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            sums = [sums[0] + float(sft.detach()), sums[1] + float(kd.detach())]
        sums = _all_reduce(sums, device)
        sft_mean, kd_mean = sums[0] / n_tok, sums[1] / n_kd
        state.losses.append(sft_mean + cfg.kd_weight * kd_mean)
        if on_step is not None:
            on_step({"step": step + 1, "loss": state.losses[-1], "sft_loss": sft_mean,
                     "kd_loss": kd_mean, "tokens": int(counts[0])})
        every = cfg.checkpoint_every
        if on_checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < total:
            on_checkpoint(step + 1, state)
    state.finished = time.time()
    return state


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry (`TorchTrainer(train_worker, train_loop_config=...)`, or one model of a
    `launch.in_turn_worker` run): read this worker's shard of `config["dataset"]`, train,
    report every step's loss (in groups of `report_every`), then save and report the checkpoint,
    its metrics naming `config["job"]` (rank 0 writes it; for ZeRO-3 every rank helps gather the
    weights). On a warm trainer (`config["out_dir"]` set, see `moco_ray.training.warm`) the rows
    come in `config["rows"]` (each rank takes every world-th), and rank 0 writes the checkpoint
    into out_dir instead of reporting it."""
    import tempfile

    import ray.train

    entered = time.time()
    cfg = DistillConfig.model_validate(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    warm = "out_dir" in config
    if warm:
        rows = config["rows"][rank::world]
    else:
        shard = ray.train.get_dataset_shard(config.get("dataset", "train"))
        rows = [plain(r) for r in shard.iter_rows()]
    pending: list[dict[str, Any]] = []

    def on_step(metrics: dict[str, Any]) -> None:
        # Every rank reports after the same steps: Ray Train needs equal report counts.
        pending.append(metrics)
        if len(pending) == cfg.report_every:
            ray.train.report({**pending[-1], "losses": [m["loss"] for m in pending]})
            pending.clear()

    def on_checkpoint(step: int, st: TrainState) -> None:
        # Every rank writes its shard into its own dir; Ray Train gathers them into one
        # checkpoint. The pending step losses go with it (reports stay equal across ranks).
        staging = env_dir(TRAIN_STORAGE_ENV)
        with tempfile.TemporaryDirectory(prefix="moco_resume_", dir=staging) as tmp:
            save_resume_point(st.engine, tmp, step, st.losses)
            if rank == 0:
                write_run_progress(tmp, config.get("done_before", []), config.get("job"), False)
            losses = [m["loss"] for m in pending]
            pending.clear()
            ray.train.report({"job": config.get("job"), "resume_step": step, "losses": losses},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))

    state = run_training(cfg, config["base_model_dir"], rows, on_step=None if warm else on_step,
                         on_checkpoint=None if warm else on_checkpoint,
                         resume_dir=config.get("resume_dir"))
    state.entered = entered  # the run began with the worker, before its data shard was read
    # Staged under the run's train storage when there is one ($MOCO_RAY_TRAIN_STORAGE, see
    # workflows/storage.py), so a run writes nothing outside its storage; else the temp dir.
    with tempfile.TemporaryDirectory(prefix="moco_ckpt_", dir=env_dir(TRAIN_STORAGE_ENV)) as tmp:
        manifest = save_checkpoint(state, cfg, config["base_model_dir"], config["model_name"],
                                   (config["out_dir"] if warm else tmp) if rank == 0 else None)
        release_engine(state.engine)
        if warm:  # the checkpoint is in place, losses in its manifest; the run reports nothing
            return
        final = {"job": config.get("job"), "step": len(state.losses), "loss": state.losses[-1],
                 "losses": state.losses, "train_entered": state.entered,
                 "train_started": state.started, "train_finished": state.finished,
                 "resumed_from": state.resumed_from}
        if rank == 0:
            assert manifest is not None
            write_run_progress(tmp, [*config.get("done_before", []), config.get("job")],
                               config.get("job"), True, state.resumed_from)
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(final)


# In every checkpoint a run reports: which of its models are done, so a restarted run (Ray
# Train's FailureConfig) skips them and resumes the one in progress. Removed from a model's
# checkpoint once it is copied out (`launch`).
RUN_PROGRESS = "moco_run_progress.json"


def write_run_progress(out_dir: str, done: list, job: str | None, final: bool,
                       resumed_from: int | None = None) -> None:
    (Path(out_dir) / RUN_PROGRESS).write_text(json.dumps(
        {"done": list(done), "job": job, "final": final, "resumed_from": resumed_from}))


def read_run_progress(ckpt_dir: str | Path) -> dict | None:
    """A checkpoint's run progress (see `write_run_progress`), or None if it has none."""
    path = Path(ckpt_dir) / RUN_PROGRESS
    return json.loads(path.read_text()) if path.is_file() else None
