"""The stages of one evolution run, over one live pool (see evolve.py for the loop)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moco_ray.config import EvolveConfig, JobSpec
from moco_ray.outputs import read_dataset, write_records
from moco_ray.pool.pool import ModelPool
from moco_ray.records import Record
from moco_ray.tasks.base import Task
from moco_ray.training import distill_all
from moco_ray.workflows.evolve.manifest import Manifest
from moco_ray.workflows.evolve.sft_data import sft_datasets
from moco_ray.workflows.sweep import job_request, run_jobs, start_coordinator

METRICS = pa.schema([("generation", pa.int64()), ("name", pa.string()), ("kind", pa.string()),
                     ("task", pa.string()), ("score", pa.float64()), ("n", pa.int64())])


class Stages:
    def __init__(self, cfg: EvolveConfig, run_dir: Path, manifest: Manifest,
                 tasks: dict[str, Task], weights: dict[str, str]):
        self.cfg, self.run_dir, self.manifest, self.tasks = cfg, run_dir, manifest, tasks
        self.weights = dict(weights)  # model -> dir of the weights it serves now
        self.models = [m.name for m in cfg.pool.members]
        self._pool = None

    # --- pool and jobs ------------------------------------------------------------------------

    @property
    def pool(self):
        if self._pool is None:

            models = [m.model_copy(update={"path": self.weights[m.name]})
                      for m in self.cfg.pool.members]
            pcfg = self.cfg.pool.model_copy(update={"models": models})
            # The registry state lives in the run dir: a resumed run's pool comes up on the
            # versions the run had swapped in and numbers later swaps after them.
            self._pool = ModelPool(pcfg, seed=self.cfg.seed,
                                   state_path=str(self.run_dir / "swap_registry.json")).start()
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _requests(self, g: int, split: str, singles: bool, system: bool) -> list:

        rcfg = self.cfg.run_config()
        specs = []
        if system:
            specs.append(("system", self.cfg.system))
        if singles:
            specs += [(m, JobSpec(strategy="single", params={"model": m}, models=[m]))
                      for m in self.models]
        return [job_request(rcfg, spec, self.tasks[t.name], f"g{g}-{split}-{label}-{t.name}",
                            generation=g, splits=(split,))
                for label, spec in specs for t in self.cfg.tasks]

    def _run(self, reqs: list) -> list[Record]:
        import ray

        coord = start_coordinator(self.pool.client(), on_gpu=self.cfg.pool.on_gpus)
        try:
            records, _ = run_jobs(coord, reqs)
        finally:
            ray.kill(coord)
        return records

    def run(self, stage: str) -> dict:
        kind, g = stage.rsplit("_", 1)
        return getattr(self, kind)(int(g))

    def run_together(self, eval_stage: str, collab_stage: str) -> list[dict]:
        """eval_g and collab_g+1 as one batch of jobs on the pool (both on generation g's
        weights); their records part again by split. Returns both stages' outputs."""
        g = int(eval_stage.rsplit("_", 1)[1])
        assert collab_stage == f"collab_{g + 1}", (eval_stage, collab_stage)
        recs = self._run(self._eval_requests(g) + self._collab_requests(g + 1))
        return [self._eval_output(g, [r for r in recs if r.split == "test"]),
                self._collab_output(g + 1, [r for r in recs if r.split == "dev"])]

    # --- stages -------------------------------------------------------------------------------

    def _collab_requests(self, g: int) -> list:
        need_singles = self.cfg.recipe == "multi_student_kd" or self.cfg.keep == "agreement"
        return self._requests(g, "dev", singles=need_singles, system=True)

    def _collab_output(self, g: int, recs: list[Record]) -> dict:
        path = write_records(recs, self.run_dir / f"gen_{g}" / "collab")
        return {"records": str(path), "n": len(recs)}

    def collab(self, g: int) -> dict:
        return self._collab_output(g, self._run(self._collab_requests(g)))

    def data(self, g: int) -> dict:
        """Each model's SFT rows, built from the collab Parquet by Ray Data and written as one
        Parquet dataset per model."""
        import shutil

        records = read_dataset(self.manifest.output(f"collab_{g}")["records"])
        datasets = sft_datasets(records, self.models, self.cfg.system.strategy, self.cfg.recipe,
                                self.cfg.keep, self.tasks, seed=self.cfg.seed + g)
        out, done = {}, {}
        for m, ds in datasets.items():
            # Models that share one dataset (supervised KD) share one execution of it.
            if id(ds) not in done:
                done[id(ds)] = ds.materialize()
            ds = done[id(ds)]
            n = ds.count()
            if n == 0:
                raise ValueError(f"data_{g}: no training rows for {m!r} (recipe "
                                 f"{self.cfg.recipe!r}, keep {self.cfg.keep!r}); the collab "
                                 "records are kept; fix: keep: all, or more dev rows")
            d = self.run_dir / f"gen_{g}" / "data" / m
            shutil.rmtree(d, ignore_errors=True)  # a half-written earlier attempt
            ds.write_parquet(str(d))
            out[m] = {"path": str(d), "n": n}
        return {"data": out}

    def distill(self, g: int) -> dict:
        import json

        import pyarrow.parquet as pq

        data = self.manifest.output(f"data_{g}")["data"]
        jobs = []
        for m in self.models:
            path, n = data[m]["path"], data[m]["n"]
            if self.cfg.distill.ingest_on_driver(n):  # checked and tokenized in distill_all
                # In a fixed order (files and rows arrive as Ray Data wrote them), so the
                # seed alone fixes the training.
                rows = sorted(pq.read_table(path).to_pylist(),
                              key=lambda r: json.dumps(r, sort_keys=True, default=str))
            else:  # read and tokenized by Ray Data tasks, streamed to the trainer's ranks
                rows = read_dataset(path)
            out = self.run_dir / f"gen_{g}" / "checkpoints" / m
            if out.exists():  # a distill killed half-way: its partial output is not a checkpoint
                import shutil

                shutil.rmtree(out)
            jobs.append((m, self.weights[m], rows, str(out)))
        infos = distill_all(jobs, self.cfg.distill)
        return {"checkpoints": {m: i.path for m, i in infos.items()},
                "final_loss": {m: i.final_loss for m, i in infos.items()},
                "seconds": {m: i.seconds for m, i in infos.items()}}

    def swap(self, g: int) -> dict:
        ckpts = self.manifest.output(f"distill_{g}")["checkpoints"]
        versions = {}
        live = self.pool.versions()  # a resumed run's pool is back on its persisted versions
        for m, path in ckpts.items():
            if live[m]["path"] == str(Path(path).resolve()):
                versions[m] = live[m]["version"]  # swapped before the run stopped
            else:
                versions[m] = self.pool.swap(m, path)
            self.weights[m] = path
        return {"versions": versions}

    def _eval_requests(self, g: int) -> list:
        return self._requests(g, "test", singles=True, system=True)

    def eval(self, g: int) -> dict:
        return self._eval_output(g, self._run(self._eval_requests(g)))

    def _eval_output(self, g: int, recs: list[Record]) -> dict:
        path = write_records(recs, self.run_dir / f"gen_{g}" / "eval")
        rows = metric_rows(recs, g, self.models)
        self._write_metrics(g, rows)
        return {"records": str(path), "metrics": rows}

    def _write_metrics(self, g: int, rows: list[dict]) -> None:
        prev = []
        for s in range(g):
            if self.manifest.done(f"eval_{s}"):
                prev += self.manifest.output(f"eval_{s}")["metrics"]
        pq.write_table(pa.Table.from_pylist(prev + rows, schema=METRICS),
                       self.run_dir / "metrics.parquet")


def metric_rows(recs: list[Record], g: int, models: list[str]) -> list[dict]:
    """Mean test score per (single model or system, task), plus the task mix ('all')."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in recs:
        # The system's jobs are labelled "system" (see _requests): a system that is itself
        # `single` (one model alone) must not pass for that model's own row.
        system = r.job.startswith(f"g{r.generation}-{r.split}-system-") or r.strategy != "single"
        name = "system" if system or not r.trace else r.trace[0].model
        for task in (r.task, "all"):
            groups[(name, task)].append(r.score or 0.0)
    return [{"generation": g, "name": n, "kind": "model" if n in models else "system",
             "task": t, "score": sum(v) / len(v), "n": len(v)}
            for (n, t), v in sorted(groups.items())]

