"""The runtime env a run's Ray job gives every worker (Ray Train's controllers among them)."""
from __future__ import annotations

from moco_ray.workflows import runtime


def test_job_env_shortens_the_train_controller_poll_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv(runtime.TRAIN_POLL_ENV, raising=False)
    env = runtime.job_env()["env_vars"]
    assert float(env[runtime.TRAIN_POLL_ENV]) < 2.0  # Ray Train's own default polls every 2 s
    monkeypatch.setenv(runtime.TRAIN_POLL_ENV, "3")
    assert runtime.job_env()["env_vars"][runtime.TRAIN_POLL_ENV] == "3"


def test_job_env_carries_the_run_settings_every_actor_must_see(monkeypatch):
    monkeypatch.setenv("MOCO_RAY_WORKDIR", "/shared/work")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = runtime.job_env()["env_vars"]
    assert env["MOCO_RAY_WORKDIR"] == "/shared/work"
    assert env["HF_ENDPOINT"] == "https://mirror.example"
    assert "HF_HUB_OFFLINE" not in env  # unset stays unset


class _FakeRay:
    """Stands in for `ray.init`: records each call; address='auto' finds a cluster or not."""

    def __init__(self, cluster_running: bool):
        self.cluster_running, self.calls, self.up = cluster_running, [], False

    def is_initialized(self):
        return self.up

    def init(self, **kw):
        self.calls.append(kw)
        if kw.get("address") == "auto" and not self.cluster_running:
            raise ConnectionError("Could not find any running Ray instance")
        if "num_cpus" in kw and kw.get("address"):
            raise ValueError("num_cpus may not be given when connecting to a cluster")
        self.up = True


def _init_with(monkeypatch, fake):
    import sys

    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(runtime, "started_cluster",
                        lambda: "10.0.0.1:6379" if fake.cluster_running else None)
    return runtime.init_ray()


def test_init_ray_attaches_to_a_running_cluster_without_local_resources(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake = _FakeRay(cluster_running=True)
    assert _init_with(monkeypatch, fake) == "auto"
    assert fake.calls == [{"address": "auto", "runtime_env": runtime.job_env()}]


def test_init_ray_starts_a_local_ray_only_when_no_cluster_runs(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake = _FakeRay(cluster_running=False)
    assert _init_with(monkeypatch, fake) == "local"
    assert [c.get("address") for c in fake.calls] == [None]
    assert fake.calls[0]["num_cpus"] >= 8


def test_init_ray_uses_ray_address_when_set(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    fake = _FakeRay(cluster_running=False)
    assert _init_with(monkeypatch, fake) == "address"
    assert fake.calls[0]["address"] == "ray://head:10001" and "num_cpus" not in fake.calls[0]


def test_driver_env_leaves_out_what_the_submitted_job_sets(monkeypatch):
    """Under `ray job submit` with env vars, repeating one of them in ray.init makes Ray refuse
    the driver; the others still go."""
    import json

    monkeypatch.setenv("MOCO_RAY_DATA", "/data/moco")
    monkeypatch.setenv("HF_HOME", "/mnt/hf")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"HF_HOME": "/mnt/hf"}}}))
    env = runtime.driver_env()["env_vars"]
    assert "HF_HOME" not in env and env["MOCO_RAY_DATA"] == "/data/moco"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert runtime.driver_env()["env_vars"]["HF_HOME"] == "/mnt/hf"
