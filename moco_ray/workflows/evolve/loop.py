"""The single-multi evolution loop: collaborate -> distill every model -> hot-swap -> evaluate.

A run lives in `<storage>/<run_name>/` (workflows/storage.py, with scratch/ and train/ for what
jobs and trainings write): the config, `manifest.json` (stages done, with their outputs),
`gen_<g>/collab/` and `gen_<g>/eval/` (Parquet records), `gen_<g>/data/<model>/` (SFT rows),
`gen_<g>/checkpoints/<model>/`, `metrics.parquet`. Stages, for generation g >= 1:

    collab_g   the system (and, for multi-student KD, every single model) on DEV, current weights
    data_g     each model's SFT rows from those dev records (Ray Data transforms)
    distill_g  every model distilled at once (Ray Train + DeepSpeed), from its current weights
    swap_g     the new checkpoints hot-swapped into the live pool
    eval_g     every single model and the system on TEST

plus `eval_0` (the starting models) first. A killed run resumes at its first unfinished stage:
the pool restarts from the newest distilled weights and nothing done is redone.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from moco_ray import models
from moco_ray.config import ConfigError, EvolveConfig
from moco_ray.records import Record
from moco_ray.workflows.evolve.manifest import Manifest
from moco_ray.workflows.evolve.stages import Stages
from moco_ray.workflows.runtime import init_ray, load_tasks
from moco_ray.workflows.storage import RunPaths, check_run_storage, storage_env


def stage_names(generations: int) -> list[str]:
    names = ["eval_0"]
    for g in range(1, generations + 1):
        names += [f"collab_{g}", f"data_{g}", f"distill_{g}", f"swap_{g}", f"eval_{g}"]
    return names


def overlaps(stages: list[str]) -> bool:
    """Whether two stages can share the pool: eval_g and collab_g+1 (same weights, no swap
    between them)."""
    if len(stages) != 2:
        return False
    (a, ga), (b, gb) = (s.rsplit("_", 1) for s in stages)
    return a == "eval" and b == "collab" and int(gb) == int(ga) + 1


def current_weights(cfg: EvolveConfig, manifest: Manifest, base_paths: dict[str, str]
                    ) -> dict[str, str]:
    """Each model's newest distilled checkpoint (or its starting weights)."""
    paths = dict(base_paths)
    for g in range(1, cfg.generations + 1):
        if manifest.done(f"distill_{g}"):
            paths.update(manifest.output(f"distill_{g}")["checkpoints"])
    return paths


ProgressFn = Callable[[str], None]


def evolve(cfg: EvolveConfig, run_dir: Path, on_stage: ProgressFn | None = None,
           stop_after: str | None = None) -> Path:
    """Run (or resume) the loop in `run_dir`. `stop_after` ends after that stage (for tests).
    What jobs and trainings write goes under `run_dir` too (`storage_env`), checked writable and
    shared by every node of the cluster before the pool starts."""
    paths = RunPaths.at(run_dir)
    run_dir = paths.root  # absolute: replicas on any node load the checkpoints written here
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists():
        saved = EvolveConfig.model_validate(yaml.safe_load(cfg_file.read_text()))
        # Dumps, not models: a secret (the pool's api_key) is never written to config.yaml.
        if saved.model_dump(mode="json") != cfg.model_dump(mode="json"):
            raise ConfigError([("config differs from the one this run started with "
                                f"({cfg_file}); resume with that config or start a new "
                                "run_name")],
                              str(run_dir))
    else:
        cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    manifest = Manifest(run_dir)
    todo = [s for s in stage_names(cfg.generations) if not manifest.done(s)]
    if not todo:
        return run_dir
    tasks = load_tasks(cfg.run_config())  # bad rows fail here, before any engine starts
    with storage_env(paths):
        init_ray()
        check_run_storage(paths)
        _run_stages(cfg, run_dir, manifest, tasks, todo, on_stage, stop_after)
    return run_dir


def _run_stages(cfg: EvolveConfig, run_dir: Path, manifest: Manifest, tasks: dict,
                todo: list[str], on_stage: ProgressFn | None, stop_after: str | None) -> None:
    base = {m.name: models.resolve_path(m.path) for m in cfg.pool.members}
    stages = Stages(cfg, run_dir, manifest, tasks, current_weights(cfg, manifest, base))
    try:
        i = 0
        while i < len(todo):
            group = todo[i:i + 2] if (cfg.overlap and stop_after != todo[i]
                                      and overlaps(todo[i:i + 2])) else todo[i:i + 1]
            if on_stage:
                on_stage(" + ".join(group))
            t0 = time.perf_counter()
            outputs = stages.run_together(*group) if len(group) == 2 else [stages.run(group[0])]
            seconds = time.perf_counter() - t0
            for stage, output in zip(group, outputs):  # a kill before this redoes both
                manifest.mark(stage, output, seconds)
            if stop_after in group:
                break
            i += len(group)
    finally:
        stages.close()


def dev_only(records: list[Record], where: str) -> list[Record]:
    """Training data comes from dev records only: a test record here is a bug, not data."""
    bad = [r for r in records if r.split != "dev"]
    if bad:
        raise ValueError(f"{where}: {len(bad)} record(s) from split {bad[0].split!r} "
                         f"(e.g. {bad[0].task}/{bad[0].example_id}); training data must be dev")
    return records
