"""`ModelPool`: starts the Serve applications of a PoolConfig and hands out handles and clients.

Each model is its own Serve application (`<pool>-<model>`, HTTP under `/<model>`), so a model
deploys, fails, scales and swaps weights without touching the others; each logit group is one more
application (handles only, no HTTP). The whole config is checked before anything deploys.
`swap` / `rollback` change a model's weights on every replica at once (see `swap.py`).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Self

import ray
from ray import serve
from ray.serve.api import RunTarget
from ray.serve.schema import ApplicationStatus

from moco_ray import models
from moco_ray.config import ConfigError, PoolConfig
from moco_ray.pool import placement
from moco_ray.pool.client import ServeClient
from moco_ray.pool.logit_group import LogitGroupServer
from moco_ray.pool.openai_api import OpenAILimits
from moco_ray.pool.server import ModelServer
from moco_ray.pool.swap import hotswap as _swap
from moco_ray.pool.swap.hotswap import WeightVersion
from moco_ray.pool.swap.sync import weight_sync


def _serve_client():
    """Serve's controller client, or None when Serve is not running in this Ray cluster.

    Private Serve API: the public one cannot tell "running with no apps" from "not started",
    and the HTTP port of an already running Serve is only known to its controller.
    """
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


class ModelPool:
    """The pool's Serve applications. Use as `with ModelPool(cfg) as pool: ...` or start/shutdown.

    `seed` reaches every engine (vLLM's and transformers' sampling seeds). `state_path`: a file
    that keeps the members' weight versions (see `swap.SwapRegistry`); a pool started on an
    existing one serves the versions it names and continues their numbering.
    """

    def __init__(self, config: PoolConfig, seed: int = 0, state_path: str | None = None):
        self.config = config
        self.seed = seed
        self.state_path = state_path
        self.paths: dict[str, str] = {}  # model name -> resolved local path
        self.http_port: int | None = None
        self._apps: dict[str, str] = {}  # model or group name -> Serve application name
        self._started_serve = False

    # --- names ----------------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        """The members (the models that collaborate and that swaps change)."""
        return [m.name for m in self.config.members]

    @property
    def scratch(self) -> list[str]:
        """Scratch deployments: weight-level jobs hot-swap candidates into them."""
        return [m.name for m in self.config.scratch]

    @property
    def groups(self) -> list[str]:
        return [g.name for g in self.config.logit_groups]

    def app_name(self, name: str) -> str:
        return f"{self.config.name}-{name}"

    def url(self, model: str) -> str:
        """Base URL of `model`'s OpenAI-compatible API (for `openai.OpenAI(base_url=...)`)."""
        if model not in self.models + self.scratch or self.http_port is None:
            raise KeyError(f"no running model {model!r}; models: {self.models + self.scratch} "
                           f"(started: {self.http_port is not None})")
        return f"http://127.0.0.1:{self.http_port}/{model}/v1"

    # --- lifecycle ------------------------------------------------------------------------

    def validate(self, check_resources: bool = True) -> None:
        """Raise one ConfigError listing every problem of the config; deploys nothing."""
        problems: list[str] = []
        for i, m in enumerate(self.config.models):
            err = models.check_path(m.path)
            if err:
                problems.append(f"pool.models.{i}.path: {err}")
        groups = self.groups
        for i, g in enumerate(self.config.logit_groups):
            if g.name in self.models:
                problems.append(f"pool.logit_groups.{i}.name: {g.name!r} is also a model name; "
                                "give the group its own name")
            if groups.count(g.name) > 1:
                problems.append(f"pool.logit_groups.{i}.name: duplicate group {g.name!r}")
        if check_resources and ray.is_initialized():
            problems += self._resource_problems()
        if problems:
            raise ConfigError(problems, "pool config")

    def _resource_problems(self) -> list[str]:
        # Serve would wait forever for replicas that cannot be placed; say so up front.
        # Autoscaling models count the replicas they start with; at max_replicas they need
        # `most`, which only the message mentions (an autoscaling cluster may add nodes).
        # A replica with parallel vLLM workers takes tensor x pipeline GPUs (its bundles).
        have = ray.cluster_resources()
        need: dict[str, float] = {}
        most: dict[str, float] = {}
        for per, start, top in (
                [(placement.replica_resources(m), m.start_replicas, m.max_replicas)
                 for m in self.config.models]
                + [({"CPU": g.num_cpus, "GPU": g.num_gpus, **g.resources}, g.replicas,
                    g.replicas) for g in self.config.logit_groups]):
            for res, amount in per.items():
                need[res] = need.get(res, 0.0) + amount * start
                most[res] = most.get(res, 0.0) + amount * top
        out = []
        for res in ("CPU", "GPU"):
            if need.get(res, 0.0) > have.get(res, 0.0) + 1e-9:
                more = (f" (autoscaling to max_replicas: {most[res]:g})"
                        if most[res] > need[res] + 1e-9 else "")
                out.append(f"pool needs {need[res]:g} {res}{more} (num_{res.lower()}s x "
                           "replicas, tensor x pipeline parallel GPUs per replica, autoscaling "
                           f"at min_replicas, groups included) but the Ray cluster has "
                           f"{have.get(res, 0.0):g}; lower num_{res.lower()}s or replicas, or "
                           "add nodes (on an autoscaling cluster pass "
                           "start(check_resources=False))")
        custom = {res: n for res, n in need.items() if res not in ("CPU", "GPU")}
        for res, n in sorted(custom.items()):
            if n > have.get(res, 0.0) + 1e-9:
                out.append(f"pool needs {n:g} of the custom resource {res!r} (resources x "
                           f"replicas, groups included) but the Ray cluster has "
                           f"{have.get(res, 0.0):g}; start nodes with it (ray start --resources "
                           "...), or change the models' resources")
        return out

    def start(self, timeout_s: float = 900.0, check_resources: bool = True) -> Self:
        """Validate, resolve paths, deploy every model and group, wait until all are RUNNING."""
        if self._apps:
            raise RuntimeError(f"pool {self.config.name!r} is already started")
        self.validate(check_resources)
        # Before anything starts: refuses a non-loopback host whose API key has left the env.
        limits = {m.name: OpenAILimits.for_model(self.config, m) for m in self.config.models}
        self.paths = {m.name: models.resolve_path(m.path) for m in self.config.models}
        client = _serve_client()
        if client is None:
            serve.start(http_options={"host": self.config.http_host,
                                      "port": self.config.http_port})
            self._started_serve = True
            client = _serve_client()
        self.http_port = client.http_config.port

        # Before any replica starts: replicas read their model's current version from it.
        registry = _swap.registry_name(self.config.name)
        _swap.start_registry(self.config.name, {
            m: {"path": self.paths[m],
                "apps": [self.app_name(m)] + [self.app_name(g.name) for g in
                                              self.config.logit_groups if m in g.models]}
            for m in self.models}, state_path=self.state_path)
        targets = []
        for m in self.config.models:
            dep = ModelServer.options(**placement.deployment_options(m))
            # A scratch deployment changes weights per request (generate_with), outside the
            # registry: its versions are its own and no record of a member depends on them.
            app = dep.bind(m.name, m.engine_spec(self.paths[m.name], seed=self.seed),
                           swap_registry=registry if m.role == "member" else None,
                           weight_sync=m.weight_sync, openai_limits=limits[m.name])
            targets.append(RunTarget(app, name=self.app_name(m.name), route_prefix=f"/{m.name}"))
        for g in self.config.logit_groups:
            dep = LogitGroupServer.options(**placement.group_options(g))
            app = dep.bind(g.name, {n: self.paths[n] for n in g.models}, dtype=g.dtype,
                           seed=self.seed, swap_registry=registry)
            targets.append(RunTarget(app, name=self.app_name(g.name), route_prefix=None))
        self._apps = {n: self.app_name(n) for n in self.models + self.scratch + self.groups}
        try:
            # Deploy all at once (engines load in parallel), then wait for the slowest.
            serve.run_many(targets, wait_for_applications_running=False)
            self._wait_running(timeout_s)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _wait_running(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            apps = serve.status().applications
            states = {a: apps.get(a) for a in self._apps.values()}
            failed = {a: s.message for a, s in states.items()
                      if s is not None and s.status == ApplicationStatus.DEPLOY_FAILED}
            if failed:
                raise RuntimeError("pool failed to start: " + "; ".join(
                    f"{a}: {msg}" for a, msg in failed.items()))
            if all(s is not None and s.status == ApplicationStatus.RUNNING
                   for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool not RUNNING after {timeout_s:g}s: " + "; ".join(
                    f"{a}: {s.status.value if s else 'missing'} {s.message if s else ''}"
                    for a, s in states.items()))
            time.sleep(0.5)

    def shutdown(self, timeout_s: float = 120.0) -> None:
        """Delete this pool's applications (and Serve itself if this pool started it)."""
        apps = list(self._apps.values())
        self._apps = {}
        for app in apps:
            serve.delete(app, _blocking=False)
        deadline = time.monotonic() + timeout_s
        while apps and time.monotonic() < deadline:
            live = serve.status().applications
            apps = [a for a in apps if a in live]
            if apps:
                time.sleep(0.5)
        if apps:
            raise TimeoutError(f"applications still deleting after {timeout_s:g}s: {apps}")
        if ray.is_initialized():
            _swap.stop_registry(self.config.name)
        if self._started_serve:
            serve.shutdown()
            self._started_serve = False
        self.http_port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- access ---------------------------------------------------------------------------

    def handle(self, name: str):
        """DeploymentHandle of a model's or logit group's server."""
        if name not in self._apps:
            raise KeyError(f"no running model or logit group {name!r}; models: {self.models}, "
                           f"groups: {self.groups}" + ("" if self._apps else " (pool not started)"))
        return serve.get_app_handle(self._apps[name])

    def health(self) -> dict[str, str]:
        """Serve's status of each model and group: RUNNING, DEPLOYING, UNHEALTHY, ..."""
        apps = serve.status().applications
        return {n: (apps[a].status.value if a in apps else ApplicationStatus.NOT_STARTED.value)
                for n, a in ((n, self.app_name(n))
                             for n in self.models + self.scratch + self.groups)}

    def client(self) -> ServeClient:
        """A picklable PoolClient for strategies and the coordinator actor."""
        return ServeClient({m: self.app_name(m) for m in self.models},
                           {g: self.app_name(g) for g in self.groups},
                           {s: self.app_name(s) for s in self.scratch})

    # --- weights --------------------------------------------------------------------------

    def swap(self, model: str, checkpoint: str, timeout_s: float = 600.0) -> int:
        """Hot-swap `checkpoint` (a dir) into every replica of `model` and of the logit groups
        holding it; returns the new version, which every later Generation of it carries.

        Validated first: a missing, corrupt, truncated or misfitting checkpoint raises SwapError
        naming the problem, and the old weights keep serving. In-flight requests finish on the
        old weights, new ones wait the moment the load takes; if a replica fails to load, every
        replica goes back to the previous version and SwapError says why.
        """
        self._require_model(model)
        sync = weight_sync(self.config.model(model).weight_sync)
        return _run(_swap.swap_model(self._registry, model, str(checkpoint), timeout_s,
                                     check=sync.check))

    def rollback(self, model: str, version: int | None = None, timeout_s: float = 600.0) -> int:
        """Serve an earlier version of `model` again (default: the newest one below the live
        one) under its own number; returns it. SwapError when there is none or it is gone."""
        self._require_model(model)
        return _run(_swap.rollback_model(self._registry, model, version, timeout_s))

    def versions(self) -> dict[str, dict]:
        """model -> {"version": live version, "path": its checkpoint dir}."""
        self._require_model(None)
        return ray.get(_swap.registry(self._registry).versions.remote())

    def history(self, model: str) -> list[WeightVersion]:
        """Every version `model` had, oldest (0, the start weights) first; failed ones marked."""
        self._require_model(model)
        return ray.get(_swap.registry(self._registry).history.remote(model))

    def group_versions(self, group: str) -> dict[int, dict[str, int]]:
        """A logit group's versions (what its Generations carry) -> its members' versions."""
        if group not in self.groups:
            raise KeyError(f"no logit group {group!r}; groups: {self.groups}")
        self._require_model(None)
        return ray.get(_swap.registry(self._registry).group_versions.remote(group))

    @property
    def _registry(self) -> str:
        return _swap.registry_name(self.config.name)

    def _require_model(self, model: str | None) -> None:
        if not self._apps:
            raise RuntimeError(f"pool {self.config.name!r} is not started; call start() first")
        if model is not None and model not in self.models:
            raise KeyError(f"no model {model!r} in pool {self.config.name!r}; models: "
                           f"{self.models} (logit groups follow their members' swaps)")


def _run(coro):
    """Run a coroutine to completion from sync code, also when this thread runs an event loop
    (then in a helper thread, since a loop cannot be re-entered)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()
