"""Finished jobs saved as they end, so a rerun takes them back instead of running them again."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from moco_ray.config import JobSpec, RunConfig
from moco_ray.coordinator import JobStatus
from moco_ray.outputs import read_records, records_to_table
from moco_ray.records import Record


class JobStore:
    """Each finished job of a run, saved the moment it ends: `<out_dir>/jobs/<job>.parquet`
    (its records) and `<job>.json` (its status and a fingerprint of everything that fixes its
    result: job spec, task spec, pool, seed). A rerun of the same config takes a saved job back
    instead of running it again; a job whose fingerprint changed (other params, other models)
    runs again. While a job runs, its records are also appended as they stream in
    (`<job>.partial/<fingerprint>-<n>.parquet`), so a run cut off (killed, out of time) loses
    only the examples in flight: the rerun of a job skips the examples it finds there (its `fit`
    runs again: what a strategy learned is not saved)."""

    def __init__(self, out_dir: Path, cfg: RunConfig):
        self.dir = Path(out_dir) / "jobs"
        self.cfg = cfg
        self._parts: dict[str, int] = {}  # job -> number of its next partial file

    def fingerprint(self, spec: JobSpec, task_name: str) -> str:
        task = next(t for t in self.cfg.tasks if t.name == task_name)
        key = {"job": spec.model_dump(mode="json"), "task": task.model_dump(mode="json"),
               "pool": self.cfg.pool.model_dump(mode="json"), "seed": self.cfg.seed}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _paths(self, job_id: str) -> tuple[Path, Path]:
        return self.dir / f"{job_id}.parquet", self.dir / f"{job_id}.json"

    def load(self, job_id: str, fingerprint: str) -> tuple[list[Record], JobStatus] | None:
        """The saved records and status of `job_id`, if it finished with this fingerprint."""
        data, meta = self._paths(job_id)
        if not (data.exists() and meta.exists()):
            return None
        saved = json.loads(meta.read_text())
        if saved.get("fingerprint") != fingerprint:
            return None
        return read_records(data), JobStatus.model_validate(saved["status"])

    def _partial_dir(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.partial"

    def append(self, job_id: str, records: list[Record], fingerprint: str) -> None:
        """Add records of a running job: one more part file, written atomically."""
        if not records:
            return
        d = self._partial_dir(job_id)
        if job_id not in self._parts:  # parts an earlier run left are numbered before ours
            d.mkdir(parents=True, exist_ok=True)
            self._parts[job_id] = sum(1 for _ in d.glob(f"{fingerprint}-*.parquet"))
        _write(records, d / f"{fingerprint}-{self._parts[job_id]:06d}.parquet")
        self._parts[job_id] += 1

    def discard_partial(self, job_id: str) -> None:
        shutil.rmtree(self._partial_dir(job_id), ignore_errors=True)
        self._parts.pop(job_id, None)

    def partial(self, job_id: str, fingerprint: str) -> list[Record]:
        """Records an unfinished run of `job_id` with this fingerprint kept (one per example:
        a part written twice by a retried poll counts once)."""
        d = self._partial_dir(job_id)
        seen: dict[tuple[str, str], Record] = {}
        for part in sorted(d.glob(f"{fingerprint}-*.parquet")) if d.is_dir() else []:
            for r in read_records(part):
                seen.setdefault((r.split, r.example_id), r)
        return list(seen.values())

    def save(self, status: JobStatus, records: list[Record], fingerprint: str) -> None:
        """Write atomically (temp file, then rename): a kill mid-write leaves no half job. The
        job's partial records go once it is saved whole."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data, meta = self._paths(status.job)
        _write(records, data)
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint,
                                   "status": status.model_dump(mode="json")}, indent=1))
        tmp.replace(meta)
        self.discard_partial(status.job)


def _write(records: list[Record], path: Path) -> None:
    """Records as Parquet at `path`, atomically (a temp file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(records_to_table(records), tmp)
    tmp.replace(path)
