"""Where a run's files live: every path derives from `<storage>/<run_name>/`, and a start-up check
that every node of the cluster can write there and sees what the others write.

    <storage>/<run_name>/          records, jobs/ (saved jobs), evolve stages, swap_registry.json
                         scratch/  what jobs write: adapters, weight candidates ($MOCO_RAY_WORKDIR)
                         train/    Ray Train storage of trainings without distill.storage_path
                                   ($MOCO_RAY_TRAIN_STORAGE)

The driver resolves the run dir to an absolute path and sets both variables before Ray starts
(`storage_env`), so the job's runtime env (`runtime.job_env`) carries them to every actor and
task. A MOCO_RAY_WORKDIR or MOCO_RAY_TRAIN_STORAGE the user set wins over the derived one (e.g.
MOCO_RAY_WORKDIR=/dev/shm/moco for faster candidate reloads on one node).
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moco_ray.config import ConfigError

WORKDIR_ENV = "MOCO_RAY_WORKDIR"
TRAIN_STORAGE_ENV = "MOCO_RAY_TRAIN_STORAGE"
PROBE_DIR = ".storage_probe"
FIX = ("set `storage` to a path every node mounts, writable by the run (NFS, EFS, Lustre, a "
       "FUSE-mounted bucket)")


@dataclass(frozen=True)
class RunPaths:
    """The dirs of one run, all absolute (as the driver resolved them)."""

    root: Path

    @classmethod
    def of(cls, storage: str, run_name: str) -> RunPaths:
        """`<storage>/<run_name>`, absolute. Symlinks are kept, not resolved: a link such as
        /shared -> /mnt/nfs may point elsewhere on another node."""
        return cls(Path(os.path.abspath(os.path.expanduser(storage))) / run_name)

    @classmethod
    def at(cls, run_dir: str | Path) -> RunPaths:
        """The paths of a run whose dir is given (an evolve `--resume RUN_DIR`)."""
        return cls(Path(os.path.abspath(os.path.expanduser(str(run_dir)))))

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def train(self) -> Path:
        return self.root / "train"

    def env(self) -> dict[str, str]:
        """The variables a run sets: derived dirs, or the user's where already set."""
        return {WORKDIR_ENV: os.environ.get(WORKDIR_ENV) or str(self.scratch),
                TRAIN_STORAGE_ENV: os.environ.get(TRAIN_STORAGE_ENV) or str(self.train)}

    def roots(self) -> list[Path]:
        """Every dir the run writes to that every node must see: the run dir, and the user's
        scratch or train dir where it lies outside it."""
        out = [self.root]
        for d in self.env().values():
            p = Path(os.path.abspath(d))
            if not p.is_relative_to(self.root) and p not in out:
                out.append(p)
        return out


@contextmanager
def storage_env(paths: RunPaths) -> Iterator[dict[str, str]]:
    """Create the run's dirs and set MOCO_RAY_WORKDIR / MOCO_RAY_TRAIN_STORAGE for the run
    (`RunPaths.env`); the previous values come back on exit, so a later run in the same process
    derives its own. Enter before `init_ray`: a Ray started inside carries them in its job env
    (actors created with `runtime.job_env()` get them on a Ray already running)."""
    env = paths.env()
    for d in [paths.root, *env.values()]:
        Path(d).mkdir(parents=True, exist_ok=True)
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StorageError(ConfigError):
    """The run's storage is not writable, or not shared, on some node(s)."""


def _probe(probe_dir: str, name: str, token: str, driver_file: str, wait_s: float) -> str | None:
    """On one node: write `<probe_dir>/<name>` (holding `token`), then wait up to `wait_s` for
    the driver's file to be readable with the same token. None, or what went wrong."""
    mine = Path(probe_dir) / name
    try:
        # A node that does not mount the storage may still have the path locally: the file
        # lands there and the driver never sees it (reported as not shared).
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text(token)
    except OSError as e:
        return f"cannot write {mine}: {type(e).__name__}: {e}"
    if _sees(Path(driver_file), token, time.monotonic() + wait_s):
        return None
    return f"does not see the driver's file {driver_file} (wrote {mine})"


def check_storage(root: str | Path, timeout_s: float = 120.0) -> None:
    """Check that every alive node of the Ray cluster can write under `root` and that the
    driver and the nodes see each other's files: one tiny task pinned to each node writes
    `<root>/.storage_probe/<node_id>` and reads the driver's probe there; the driver then reads
    every node's. Raises one StorageError naming each failing node (id and IP) and the path.
    The probe dir is removed either way. On one local node this is one task."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = Path(os.path.abspath(root))
    token = uuid.uuid4().hex
    probe_dir = root / PROBE_DIR
    driver_file = probe_dir / f"driver-{token}"
    problems: dict[str, str] = {}
    try:
        try:
            probe_dir.mkdir(parents=True, exist_ok=True)
            driver_file.write_text(token)
        except OSError as e:
            raise StorageError([f"the driver cannot write {driver_file}: {type(e).__name__}: {e}",
                                FIX], f"storage {root}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(_probe)
        deadline = time.monotonic() + timeout_s
        refs = {probe.options(num_cpus=0, max_retries=0, scheduling_strategy=(
                    NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))).remote(
                    str(probe_dir), n["NodeID"], token, str(driver_file), timeout_s): n
                for n in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s + 5)
        for ref in late:
            problems[refs[ref]["NodeID"]] = f"did not run the probe within {timeout_s:.0f} s"
            ray.cancel(ref, force=True)
        for ref in ready:
            node = refs[ref]["NodeID"]
            try:
                err = ray.get(ref)
            except ray.exceptions.RayError as e:
                err = f"probe task failed: {e}"
            if err:
                problems[node] = err
        for n in nodes:  # the driver must see each file a node wrote
            node = n["NodeID"]
            if node not in problems and not _sees(probe_dir / node, token, deadline):
                problems[node] = (f"wrote {probe_dir / node}, which the driver does not see "
                                  "(the path is local to that node)")
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if problems:
        ips = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
        raise StorageError([f"node {node} ({ips[node]}): {msg}"
                            for node, msg in problems.items()] + [FIX], f"storage {root}")


def _sees(path: Path, token: str, deadline: float) -> bool:
    """Whether `path` holds `token` by `deadline` (time.monotonic). Polled: a network
    filesystem may show another node's new file a little late."""
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def check_run_storage(paths: RunPaths, timeout_s: float = 120.0) -> None:
    """`check_storage` on every dir the run writes to (`RunPaths.roots`)."""
    for root in paths.roots():
        check_storage(root, timeout_s)
