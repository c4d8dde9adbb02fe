"""The runtime env a run's Ray job gives every worker (Ray Train's controllers among them)."""
from __future__ import annotations

from moco_ray.workflows import runtime


def test_job_env_shortens_the_train_controller_poll_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv(runtime.TRAIN_POLL_ENV, raising=False)
    env = runtime.job_env()["env_vars"]
    assert float(env[runtime.TRAIN_POLL_ENV]) < 2.0  # Ray Train's own default polls every 2 s
    monkeypatch.setenv(runtime.TRAIN_POLL_ENV, "3")
    assert runtime.job_env()["env_vars"][runtime.TRAIN_POLL_ENV] == "3"
