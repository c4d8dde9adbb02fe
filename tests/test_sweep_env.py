"""The runtime env a run's Ray job gives every worker (Ray Train's controllers among them)."""
from __future__ import annotations

from moco_ray import sweep


def test_job_env_shortens_the_train_controller_poll_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv(sweep.TRAIN_POLL_ENV, raising=False)
    env = sweep.job_env()["env_vars"]
    assert float(env[sweep.TRAIN_POLL_ENV]) < 2.0  # Ray Train's own default polls every 2 s
    monkeypatch.setenv(sweep.TRAIN_POLL_ENV, "3")
    assert sweep.job_env()["env_vars"][sweep.TRAIN_POLL_ENV] == "3"
