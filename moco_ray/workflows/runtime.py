"""The runtime every workflow shares: connecting to Ray with the job's env, and the tasks
loaded on the driver before any engine starts."""
from __future__ import annotations

import os

from moco_ray.config import RunConfig
from moco_ray.tasks.base import Task
from moco_ray.tasks.loaders import load_task


def load_tasks(cfg: RunConfig) -> dict[str, Task]:
    """Load every task on the driver, so a bad row fails before any engine starts."""
    return {t.name: load_task(t) for t in cfg.tasks}


# How often Ray Train's controller polls its workers (Ray's default: 2 s). Jobs run many short
# adapter trainings, and each waited up to a poll to be seen finished: a 2-step tiny-model
# training handed back in ~4.3 s at 2 s and ~1.6 s at 0.5 s (14.5 s in all, now ~11 s). Set the
# variable to override.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"


# Settings every actor and task of a run must see as the driver does (the coordinator reads
# MOCO_RAY_WORKDIR for the adapters and candidates it writes and trainers MOCO_RAY_TRAIN_STORAGE
# for Ray Train's storage, both derived from the run's `storage` (workflows/storage.py); engines
# and trainers read the hub settings when they open a model): passed on in the job's runtime env
# when set.
FORWARDED_ENV = ("MOCO_RAY_WORKDIR", "MOCO_RAY_TRAIN_STORAGE", "MOCO_RAY_CACHE", "MOCO_RAY_DATA",
                 "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN")


def job_env() -> dict:
    """The runtime env of a run's Ray job: env vars every worker gets (the Train controllers
    among them), on a local Ray and on a cluster alike."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env[TRAIN_POLL_ENV] = os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_S)
    return {"env_vars": env}


def driver_env() -> dict:
    """`job_env()` for this driver's `ray.init`, less the env vars a submitted job's own runtime
    env sets (`ray job submit --runtime-env-json`, a RayJob's runtimeEnvYAML): Ray refuses a
    driver whose env var keys repeat the job's ("Failed to merge the Job's runtime env"), and
    the job's workers get those from the job anyway."""
    import json

    env = job_env()
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            submitted = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            submitted = {}
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in submitted}
    return env


def started_cluster() -> str | None:
    """The address of the cluster `ray start` last started on this node, or None. Only that
    one: `address="auto"` alone would also take any Ray instance it finds running here, such as
    another program's local Ray."""
    try:  # Ray's own lookup for `ray.init()` without an address (a private helper)
        from ray._private.services import find_bootstrap_address
    except ImportError:
        return None
    return find_bootstrap_address(None)


def init_ray(num_cpus: int | None = None) -> str:
    """Attach to a running cluster, else start a local Ray; returns which ("address", "auto" or
    "local"). A cluster is $RAY_ADDRESS (e.g. under `ray job submit`), else the one `ray start`
    runs on this node (`started_cluster`); only where neither exists does a local Ray start, with
    token auth off. Cluster resources are the cluster's own: `num_cpus` applies to a local Ray."""
    import ray

    if ray.is_initialized():
        return "initialized"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=driver_env())
        return "address"
    if started_cluster() is not None:
        ray.init(address="auto", runtime_env=driver_env())
        return "auto"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A local run shares one machine between the pool, Ray Data and the trainers; engines sit
    # idle while trainers run, so declare more logical CPUs than cores rather than deadlock
    # (a Ray Data task waiting forever for a CPU the pool's replicas hold).
    ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False, runtime_env=job_env())
    return "local"
