"""One `storage` root per run: the config key (and its old name), the dirs derived from it, the
env that carries them to the coordinator, and the start-up check that every node shares it (on
the session's local Ray, and on a real 2-node Ray cluster where one node does not share the
path)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moco_ray.config import ConfigError, EvolveConfig, RunConfig, validate_schema
from moco_ray.workflows.storage import (
    PROBE_DIR,
    TRAIN_STORAGE_ENV,
    WORKDIR_ENV,
    RunPaths,
    StorageError,
    check_storage,
    storage_env,
)

ROOT = Path(__file__).resolve().parents[2]
RUN = {"pool": {"models": [{"name": "a", "path": "zoo:tiny"}]},
       "tasks": [{"name": "max", "source": "synthetic"}], "jobs": [{"strategy": "single"}]}
EVOLVE = {**{k: RUN[k] for k in ("pool", "tasks")}, "system": {"strategy": "single"}}


# --- the config key ------------------------------------------------------------------------------

def test_output_dir_is_a_deprecated_name_of_storage():
    assert RunConfig.model_validate(RUN).storage == "runs"
    with pytest.warns(FutureWarning, match="output_dir is deprecated"):
        old = RunConfig.model_validate({**RUN, "output_dir": "/data/runs"})
    assert old.storage == "/data/runs" and "output_dir" not in old.model_dump()
    with pytest.warns(FutureWarning):
        same = RunConfig.model_validate({**RUN, "output_dir": "/d", "storage": "/d"})
    assert same.storage == "/d"
    with pytest.raises(ConfigError) as ei:
        validate_schema(RunConfig, {**RUN, "output_dir": "/a", "storage": "/b"})
    assert "output_dir ('/a') and storage ('/b') differ" in str(ei.value)
    with pytest.warns(FutureWarning):
        evo = EvolveConfig.model_validate({**EVOLVE, "output_dir": "/e"})
    assert evo.storage == "/e" and evo.run_config().storage == "/e"


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://b/r", "abfss://c@acct/r",
                                 "file:///shared/runs"])
@pytest.mark.parametrize("schema", [RunConfig, EvolveConfig])
def test_object_store_uris_are_refused(uri, schema):
    raw = {**(RUN if schema is RunConfig else EVOLVE), "storage": uri}
    with pytest.raises(ConfigError) as ei:
        validate_schema(schema, raw)
    msg = str(ei.value)
    assert "storage:" in msg and uri in msg
    assert "only a shared filesystem path is supported" in msg


def test_cli_storage_option_and_its_old_name_are_checked_like_the_key():
    from moco_ray.cli import app

    cfg = str(ROOT / "configs/sweeps/tiny_sweep.yaml")
    for flag in ("--storage", "--output-dir"):
        res = CliRunner().invoke(app, ["run", cfg, flag, "s3://bucket/runs"])
        out = " ".join(res.output.split())  # the console wraps lines
        assert res.exit_code == 2, out
        assert "--storage has 1 problem(s)" in out and "only a shared filesystem path" in out, out


# --- derived dirs and env ------------------------------------------------------------------------

def test_every_dir_derives_from_storage_and_run_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    monkeypatch.delenv(TRAIN_STORAGE_ENV, raising=False)
    p = RunPaths.of("runs", "exp")
    assert p.root == tmp_path / "runs" / "exp" and p.root.is_absolute()
    assert (p.scratch, p.train) == (p.root / "scratch", p.root / "train")
    assert p.env() == {WORKDIR_ENV: str(p.scratch), TRAIN_STORAGE_ENV: str(p.train)}
    assert p.roots() == [p.root]
    assert RunPaths.of("~/st", "r").root == Path.home() / "st" / "r"
    assert RunPaths.at("runs/exp") == p
    # A link is kept as given: it may point elsewhere on another node.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert RunPaths.of(str(tmp_path / "link"), "r").root == tmp_path / "link" / "r"


def test_a_workdir_the_user_set_wins_and_is_checked_too(monkeypatch, tmp_path):
    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path / "shm"))
    monkeypatch.delenv(TRAIN_STORAGE_ENV, raising=False)
    p = RunPaths.of(str(tmp_path / "st"), "r")
    assert p.env() == {WORKDIR_ENV: str(tmp_path / "shm"), TRAIN_STORAGE_ENV: str(p.train)}
    assert p.roots() == [p.root, tmp_path / "shm"]


def test_storage_env_sets_the_run_dirs_and_restores_the_env(monkeypatch, tmp_path):
    from moco_ray.training.runs import scratch_storage
    from moco_ray.workflows.runtime import job_env

    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    monkeypatch.setenv(TRAIN_STORAGE_ENV, "")  # empty counts as unset
    p = RunPaths.of(str(tmp_path / "st"), "r")
    with storage_env(p):
        assert os.environ[WORKDIR_ENV] == str(p.scratch) and p.scratch.is_dir()
        assert os.environ[TRAIN_STORAGE_ENV] == str(p.train) and p.train.is_dir()
        env = job_env()["env_vars"]  # what every actor of the run is given
        assert env[WORKDIR_ENV] == str(p.scratch) and env[TRAIN_STORAGE_ENV] == str(p.train)
        # Ray Train storage of a training without storage_path: under train/, not scratch/
        assert Path(scratch_storage("moco_distill_")).parent == p.train
    assert WORKDIR_ENV not in os.environ and os.environ[TRAIN_STORAGE_ENV] == ""


def test_the_driver_cannot_write_storage(tmp_path):
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(StorageError) as ei:
        check_storage(tmp_path / "file" / "run")
    msg = str(ei.value)
    assert f"the driver cannot write {tmp_path / 'file' / 'run'}" in msg
    assert "every node mounts" in msg


# --- on the session's local Ray --------------------------------------------------------------------

def test_one_local_node_passes_quickly_and_leaves_no_probe(ray_session, tmp_path):
    check_storage(tmp_path, timeout_s=10)  # a warm-up: the first task may start a worker
    t0 = time.monotonic()
    check_storage(tmp_path, timeout_s=10)
    took = time.monotonic() - t0
    assert not (tmp_path / PROBE_DIR).exists()
    assert took < 5, took  # ~0.1 s on an idle machine


def test_the_coordinator_gets_the_run_dirs_on_a_ray_started_before_the_run(ray_session,
                                                                           tmp_path):
    """The session's Ray was started without this run's dirs; the coordinator carries them, so
    a job's workdir (adapters, weight candidates) lands in <storage>/<run>/scratch."""
    from moco_ray.strategies.base import StrategyContext
    from moco_ray.workflows.sweep import start_coordinator

    def in_actor(_self):
        ctx = StrategyContext(None, None, [], job_id="job/1")
        return ctx.workdir, os.environ.get(TRAIN_STORAGE_ENV)

    p = RunPaths.of(str(tmp_path / "st"), "r")
    with storage_env(p):
        coord = start_coordinator(None)
    try:
        workdir, train = ray_session.get(coord.__ray_call__.remote(in_actor))
    finally:
        ray_session.kill(coord)
    assert Path(workdir).parent == p.scratch and Path(workdir).name.startswith("moco_job_1_")
    assert train == str(p.train)


# --- a real 2-node cluster ------------------------------------------------------------------------

# Started in the node's Python processes (the raylet's PYTHONPATH): each sees an empty tmpfs of
# its own at $MOCO_TEST_NODE_LOCAL, as a node that does not mount a share sees a local dir there.
HOOK = '''
import ctypes
import os

_dir = os.environ.get("MOCO_TEST_NODE_LOCAL")
if _dir and os.path.isdir(_dir):
    _libc = ctypes.CDLL(None, use_errno=True)
    _NEWNS, _NEWUSER, _REC, _PRIVATE = 0x20000, 0x10000000, 0x4000, 0x40000
    if _libc.unshare(_NEWNS) != 0:  # no CAP_SYS_ADMIN: a user namespace of our own
        uid, gid = os.getuid(), os.getgid()
        if _libc.unshare(_NEWUSER | _NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        for f, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                        ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{f}", "w") as fh:
                fh.write(text)
    for args in ((b"none", b"/", None, _REC | _PRIVATE, None),
                 (b"tmpfs", _dir.encode(), b"tmpfs", 0, None)):
        if _libc.mount(*args) != 0:
            raise OSError(ctypes.get_errno(), f"mount {args}")
'''

# Run in a subprocess: the session's Ray (ray_session) stays as it is.
CLUSTER = '''
import json, os, sys, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from moco_ray.workflows.storage import StorageError, check_storage

tmp, hook = Path(sys.argv[1]), sys.argv[2]
shared, local = tmp / "shared", tmp / "local"
out = {}
cluster = Cluster(initialize_head=True,
                  head_node_args={"num_cpus": 0, "include_dashboard": False})
try:
    node = cluster.add_node(num_cpus=1, env_vars={"PYTHONPATH": hook,
                                                  "MOCO_TEST_NODE_LOCAL": str(local)})
    ray.init(address=cluster.address, log_to_driver=False)
    out.update(head=cluster.head_node.node_id, node=node.node_id, ip=node.node_ip_address,
               alive=sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]))
    check_storage(shared, timeout_s=20)
    out["shared_left"] = sorted(os.listdir(shared))
    t0 = time.monotonic()
    try:
        check_storage(local, timeout_s=3)
    except StorageError as e:
        out["error"] = str(e)
    out["fail_s"] = time.monotonic() - t0
    out["local_left"] = sorted(os.listdir(local))
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(out))
'''


def _private_mounts_work(hook: Path, probe: Path) -> bool:
    """Whether this machine lets a process mount a private tmpfs (root, or user namespaces)."""
    code = f"import os; open({str(probe / 'f')!r}, 'w').close()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(hook),
                              "MOCO_TEST_NODE_LOCAL": str(probe)})
    return res.returncode == 0 and not (probe / "f").exists()


@pytest.mark.timeout(300)
def test_a_node_that_does_not_share_storage_is_named(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(HOOK))
    for d in ("shared", "local", "probe"):
        (tmp_path / d).mkdir()
    if not _private_mounts_work(hook, tmp_path / "probe"):
        pytest.skip("no private mounts here (needs root or unprivileged user namespaces)")
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, str(script), str(tmp_path), str(hook)], env=env,
                         capture_output=True, text=True, timeout=280, check=False)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["alive"] == sorted([out["head"], out["node"]])
    # Both nodes see the shared dir: the check passes and removes its probe dir.
    assert out["shared_left"] == []
    # The node with its own dir at that path is named (id and IP) with the path; the head is not.
    err = out["error"]
    assert f"node {out['node']} ({out['ip']})" in err, err
    assert out["head"] not in err and str(tmp_path / "local") in err
    assert "does not see the driver's file" in err and "every node mounts" in err
    assert out["local_left"] == [] and out["fail_s"] < 15
