"""A real multi-node Ray cluster on this machine, one for every test in this folder.

`ray.cluster_utils.Cluster` starts a head with no CPUs (job drivers run there, so nothing of a
pool or a training can) and three worker nodes, each with its own custom resources and its own
TMPDIR: a file a process puts in its node's temp dir lands in that node's dir, so a node-local
path cannot pass for shared storage unnoticed. Work reaches the cluster as Ray jobs
(`JobSubmissionClient`, as on a real cluster); this process never connects a driver to it, so
the session's local Ray (`ray_session`) is left alone. Ray's own temp dir (sessions, sockets and
the `ray_current_cluster` file that `ray.init()` on this machine would attach to) is a private
one for the cluster's life, so other Ray programs on this machine never find this cluster.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Self

import pytest
from ports import free_port

VENV_BIN = Path(sys.executable).parent
# Worker nodes: name -> custom resources. `spare` sits on two nodes, with room for two replicas
# on either: replicas pinned to it can move to the other node when theirs goes.
NODES = {"a": {"node_a": 10, "spare": 2}, "b": {"node_b": 10}, "c": {"node_c": 10, "spare": 2}}
NODE_CPUS = 2


@dataclass
class LocalCluster:
    cluster: object  # ray.cluster_utils.Cluster
    nodes: dict[str, object]  # worker node name -> ray._private.node.Node
    tmpdirs: dict[str, Path]  # "head" and each worker node -> its TMPDIR
    dashboard: str
    job_env: dict[str, str]

    @cached_property
    def jobs(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def node_name(self, node_id: str | None) -> str | None:
        """"head", a worker node's name, or None (an actor never placed)."""
        if node_id == self.cluster.head_node.node_id:
            return "head"
        return next((n for n, node in self.nodes.items() if node.node_id == node_id), None)

    def submit(self, command: str, cwd: Path) -> str:
        """A Ray job running `command` (a moco-ray command line) in `cwd` on the head node."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.jobs.submit_job(entrypoint=f"cd {cwd} && {VENV_BIN}/{command}",
                                            runtime_env={"env_vars": self.job_env})
            except RuntimeError as e:  # the head's dashboard agent may still be starting
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def wait(self, job_id: str, timeout_s: float, poll=None):
        """The job's final status; `poll()` runs about twice a second meanwhile."""
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout_s
        while True:
            status = self.jobs.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status
            if time.monotonic() > deadline:
                self.jobs.stop_job(job_id)
                raise TimeoutError(f"job {job_id} still {status} after {timeout_s:g}s:\n"
                                   + self.logs(job_id))
            if poll is not None:
                poll()
            time.sleep(0.5)

    def logs(self, job_id: str) -> str:
        return self.jobs.get_job_logs(job_id)[-6000:]

    def actors(self, class_name: str) -> list:
        """Every actor of `class_name` the cluster has had, alive or dead (state API)."""
        from ray.util.state import list_actors

        return list_actors(address=self.dashboard, filters=[("class_name", "=", class_name)],
                           limit=10_000, raise_on_missing_output=False)

    def tmp_entries(self) -> dict[str, set[str]]:
        return {n: set(os.listdir(d)) for n, d in self.tmpdirs.items()}

    def watch_tmp(self) -> TmpWatch:
        return TmpWatch(self)

    def remove(self, name: str) -> None:
        """Kill every process of worker node `name` at once, as a lost machine."""
        self.cluster.remove_node(self.nodes[name], allow_graceful=False)


class TmpWatch:
    """Lists every node's TMPDIR a few times a second while a job runs: `seen` holds what
    appeared there at any time (a run's node-local scratch, even if removed before it ended),
    `left` what was still there at the end."""

    def __init__(self, cluster: LocalCluster):
        self.cluster, self.seen = cluster, {n: set() for n in cluster.tmpdirs}
        self.before = cluster.tmp_entries()
        self.left: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for n, names in self.cluster.tmp_entries().items():
                self.seen[n] |= names - self.before[n]
            self._stop.wait(0.2)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.left = {n: names - self.before[n] for n, names in self.cluster.tmp_entries().items()}
        for n, names in self.left.items():
            self.seen[n] |= names

    @staticmethod
    def moco(entries: dict[str, set[str]]) -> dict[str, set[str]]:
        """The entries moco_ray made (its temp dirs are all named moco_*), by node."""
        out = {n: {f for f in names if f.startswith("moco")} for n, names in entries.items()}
        return {n: names for n, names in out.items() if names}


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory, _zoo_cache):
    from ray.cluster_utils import Cluster

    base = tmp_path_factory.mktemp("cluster")
    tmpdirs = {n: base / f"tmp_{n}" for n in ["head", *NODES]}
    for d in tmpdirs.values():
        d.mkdir()
    # Each node's environment, as `ray start` on a real node would have it: the model cache on
    # storage every node sees (a job's driver builds zoo models there on first use).
    node_env = {"RAY_AUTH_MODE": "disabled", "MOCO_RAY_CACHE": _zoo_cache, "HF_HUB_OFFLINE": "1"}
    # Short: Ray's socket paths live under it (a Unix socket path has at most 107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="moco_cluster_")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    cluster = None
    try:
        # Free ports: another Ray on this machine may hold the defaults (8265, and 52365 for
        # the head's dashboard agent, without which no job can be submitted).
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "env_vars": {**node_env, "TMPDIR": str(tmpdirs["head"])}})
        nodes = {n: cluster.add_node(num_cpus=NODE_CPUS, resources=res,
                                     env_vars={**node_env, "TMPDIR": str(tmpdirs[n])})
                 for n, res in NODES.items()}
        cluster.wait_for_nodes()
        # A job's own env holds no variable that `init_ray` forwards (runtime.FORWARDED_ENV):
        # Ray refuses a driver's ray.init runtime env that sets a key the job's already does.
        env = {"TOKENIZERS_PARALLELISM": "false"}
        yield LocalCluster(cluster, nodes, tmpdirs, f"http://{cluster.webui_url}", env)
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(ray_tmp, ignore_errors=True)
