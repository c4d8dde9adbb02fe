"""Hot-swap: new weights into every replica of a live pool model, validated first, with rollback.

The one module where served weights change. A swap of `model` to a checkpoint dir:

  1. `validate` before anything changes: the dir, its manifest (sha256 of every weight file, when
     it has one) and its fit to the live model (architecture, tensor names and shapes, tokenizer
     vocabulary). A refused checkpoint leaves the old weights serving.
  2. The pool's `SwapRegistry` (a named Ray actor) makes it the model's next version. Replicas
     that start from then on (autoscaling, restarts) load it in their constructor.
  3. Serve's `DeploymentHandle.broadcast` reaches every live replica of the model, and of each
     logit group holding it; each runs `apply`: pause (new requests wait at its `WeightGate`,
     in-flight ones finish) -> load (the engine resets its prefix cache) -> bump the version ->
     resume. Rounds repeat until Serve reports every replica RUNNING on the new version.
  4. A replica that fails to load puts the whole model back on the previous version; the error
     names the replica's problem.

Versions count per model from 0 (the weights the pool started with) and keep their paths in the
registry's history, so `rollback` re-applies an earlier one under its own number: a version
number always names the same weights (lineage). Disk now: a version is a dir every replica can
read; a collective (NCCL) source would swap `validate` and the servers' load for its own.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from moco_ray.models.checkpoint import (
    MANIFEST,
    checkpoint_shapes,
    validate_checkpoint,
    verify_checkpoint,
)
from moco_ray.models.paths import local_model_dir

logger = logging.getLogger(__name__)

NAMESPACE = "moco_ray"
# Keys a re-save changes without changing what the model computes (dtype: engines cast on load).
_CONFIG_KEYS_IGNORED = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                                  "use_cache", "initializer_range"})
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Replica states that end in RUNNING by themselves; a swap waits for them a while.
_TRANSIENT = ("STARTING", "UPDATING", "RECOVERING")


class SwapError(ValueError):
    """A checkpoint refused, or a swap that failed and was undone: the old weights serve."""


class WeightVersion(BaseModel):
    """One version of a model's weights, as the registry and the replicas hand it around."""

    model_config = ConfigDict(frozen=True)
    version: int = Field(ge=0, description="0: the weights the pool started with")
    path: str = Field(description="checkpoint dir the weights are read from")
    created: float = Field(default_factory=time.time)
    failed: str | None = Field(None, description="why the swap to it failed (it never served)")


# --- 1. validation -----------------------------------------------------------------------------

def validate(path: str, live_dir: str) -> None:
    """Raise SwapError naming every reason `path` cannot replace the weights of `live_dir`."""
    root, live = Path(path), local_model_dir(live_dir)
    where = f"checkpoint {str(path)!r} refused (the old weights keep serving)"
    if not root.is_dir():
        raise SwapError(f"{where}: no such directory; pass the dir the checkpoint was saved to")
    if (root / "adapter_config.json").is_file() and not (root / "config.json").is_file():
        raise SwapError(f"{where}: it is a LoRA adapter, not full weights; swap in a merged "
                        "checkpoint (distill output='merged') or serve the adapter (enable_lora)")
    missing = [f"no {what}" for what, ok in (
        ("config.json", (root / "config.json").is_file()),
        ("*.safetensors weight files", any(root.glob("*.safetensors")))) if not ok]
    if missing:
        raise SwapError(f"{where}: {'; '.join(missing)}; save it with save_pretrained")
    if (root / MANIFEST).is_file():
        try:
            verify_checkpoint(root)
        except ValueError as e:
            raise SwapError(f"{where}: {e}") from None
    try:
        checkpoint_shapes(root)
    except ValueError as e:
        raise SwapError(f"{where}: corrupt or truncated weights: {e}") from None
    problems = _config_problems(live, root)
    try:
        validate_checkpoint(checkpoint_shapes(live), root)
    except ValueError as e:
        problems.append(str(e).split("; old weights kept: ", 1)[-1])
    if any((root / f).is_file() for f in _TOKENIZER_FILES):
        problems += _vocab_problems(str(live), root)
    if problems:
        raise SwapError(f"{where}: it does not fit the live model: " + "; ".join(problems))


def _config_problems(live: Path, root: Path) -> list[str]:
    try:
        new = json.loads((root / "config.json").read_text())
    except json.JSONDecodeError as e:
        return [f"config.json is not valid JSON ({e})"]
    old = json.loads((live / "config.json").read_text())
    keys = sorted((set(old) | set(new)) - _CONFIG_KEYS_IGNORED)
    return [f"config {k!r} is {new.get(k)!r}, the live model has {old.get(k)!r}"
            for k in keys if old.get(k) != new.get(k)]


@lru_cache(maxsize=16)
def _live_vocab(live: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(live).get_vocab()


def _vocab_problems(live: str, root: Path) -> list[str]:
    from transformers import AutoTokenizer

    try:
        vocab = AutoTokenizer.from_pretrained(str(root)).get_vocab()
    except (OSError, ValueError) as e:
        return [f"its tokenizer does not load ({e})"]
    old = _live_vocab(live)
    if vocab == old:
        return []
    differ = sorted(t for t in set(vocab) | set(old) if vocab.get(t) != old.get(t))
    return [f"tokenizer vocabulary differs from the live one ({len(vocab)} vs {len(old)} "
            + f"tokens, e.g. {differ[:5]})"]


# --- 3. inside a replica: pause -> load -> bump version -> resume ------------------------------

class WeightGate:
    """Requests pass while open; `paused()` closes it, waits for the requests inside to finish,
    and opens it again on exit. Requests that arrive meanwhile wait, they do not fail."""

    def __init__(self):
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inside = 0

    @asynccontextmanager
    async def request(self):
        while not self._open.is_set():  # re-check: a second pause may close it before we run
            await self._open.wait()
        self._inside += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0:
                self._idle.set()

    @asynccontextmanager
    async def paused(self):
        self._open.clear()
        try:
            while self._inside:
                await self._idle.wait()
            yield
        finally:
            self._open.set()


async def apply(gate: WeightGate, load: Callable[[WeightVersion], Awaitable[object]],
                target: WeightVersion, commit: Callable[[WeightVersion], None]) -> None:
    """Serve `target`: pause, `load(target)` (a weight-sync backend's load; the engine resets its
    prefix cache: its KV came from the old weights), `commit` the new version while still
    paused, so every later answer carries it."""
    async with gate.paused():
        await load(target)
        commit(target)


# --- 2. the registry ---------------------------------------------------------------------------

class SwapRegistry:
    """Per pool: each model's live version, its history, the Serve apps that serve it, and a
    lease so that one swap of a model runs at a time. `models`: name -> {path, apps}.

    With `state_path`, every change is written there (atomically, JSON), and a registry started
    on an existing file continues it: models keep their history and live version, so a pool
    restarted after a crash (e.g. `moco-ray evolve --resume`) comes up on the same weights and
    numbers its next swap after the last one, and records keep one lineage across restarts."""

    def __init__(self, models: dict[str, dict], state_path: str | None = None):
        self._history = {m: [WeightVersion(version=0, path=s["path"])] for m, s in models.items()}
        self._current = dict.fromkeys(models, 0)
        self._apps = {m: list(s["apps"]) for m, s in models.items()}
        self._leases: dict[str, tuple[str, float]] = {}
        self._groups: dict[str, list[dict[str, int]]] = {}  # group -> member versions by number
        self._state_path = Path(state_path) if state_path else None
        if self._state_path is not None and self._state_path.is_file():
            self._load(self._state_path)
        self._save()

    def _load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
            history = {m: [WeightVersion(**v) for v in vs]
                       for m, vs in state["history"].items()}
            current, groups = state["current"], state.get("groups", {})
        except (ValueError, KeyError, TypeError) as e:
            raise SwapError(f"swap registry state {str(path)!r} is unreadable ({e}); move it "
                            "away to start the pool's versions afresh") from None
        for m in self._history:  # models the state knows continue; new ones start at 0
            if history.get(m):
                self._history[m] = history[m]
                self._current[m] = int(current.get(m, 0))
        self._groups = {g: [dict(c) for c in combos] for g, combos in groups.items()}

    def _save(self) -> None:
        if self._state_path is None:
            return
        state = {"history": {m: [v.model_dump() for v in vs] for m, vs in self._history.items()},
                 "current": self._current, "groups": self._groups}
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self._state_path)

    def _get(self, model: str, version: int) -> WeightVersion:
        if model not in self._history:
            raise KeyError(f"no model {model!r} in this pool; models: {sorted(self._history)}")
        found = next((v for v in self._history[model] if v.version == version), None)
        if found is None:
            raise KeyError(f"{model!r} has no version {version}; versions: "
                           f"{[v.version for v in self._history[model]]}")
        return found

    def current(self, model: str) -> WeightVersion:
        return self._get(model, self._current.get(model, 0))

    def history(self, model: str) -> list[WeightVersion]:
        self._get(model, 0)
        return list(self._history[model])

    def apps(self, model: str) -> list[str]:
        self._get(model, 0)
        return self._apps[model]

    def versions(self) -> dict[str, dict]:
        return {m: {"version": v, "path": self._get(m, v).path} for m, v in self._current.items()}

    async def acquire(self, model: str, wait_s: float, hold_s: float) -> str:
        self._get(model, 0)
        deadline = time.monotonic() + wait_s
        while (lease := self._leases.get(model)) and lease[1] > time.monotonic():
            if time.monotonic() > deadline:
                raise SwapError(f"another swap of {model!r} is still running after {wait_s:g}s; "
                                "wait for it, or raise timeout_s")
            await asyncio.sleep(0.05)
        token = uuid.uuid4().hex
        self._leases[model] = (token, time.monotonic() + hold_s)  # expires if its holder dies
        return token

    def release(self, model: str, token: str) -> None:
        if self._leases.get(model, ("",))[0] == token:
            del self._leases[model]

    def propose(self, model: str, path: str) -> WeightVersion:
        new = WeightVersion(version=max(v.version for v in self._history[model]) + 1, path=path)
        self._history[model].append(new)
        self._current[model] = new.version
        self._save()
        return new

    def activate(self, model: str, version: int) -> WeightVersion:
        self._current[model] = self._get(model, version).version
        self._save()
        return self.current(model)

    def group_version(self, group: str, members: dict[str, int]) -> int:
        """A logit group's number for this combination of its members' versions (the first one
        it reports, at its start, is 0); the same combination always gets the same number."""
        seen = self._groups.setdefault(group, [])
        if members not in seen:
            seen.append(dict(members))
            self._save()
        return seen.index(members)

    def group_versions(self, group: str) -> dict[int, dict[str, int]]:
        return dict(enumerate(self._groups.get(group, [])))

    def mark_failed(self, model: str, version: int, reason: str) -> None:
        h = self._history[model]
        h[:] = [v.model_copy(update={"failed": reason}) if v.version == version else v for v in h]
        self._save()


def registry_name(pool: str) -> str:
    return f"moco_swap-{pool}"


def start_registry(pool: str, models: dict[str, dict], state_path: str | None = None):
    """The registry for `pool` (one left by an earlier run of the same pool is replaced),
    continuing `state_path` when that file exists. Detached: replicas belong to Serve's
    controller and outlive the driver's job. Pinned to the driver's node (Ray puts an actor that
    needs no CPU on any node, and a soft affinity is often ignored): a lost worker node must not
    take the versions with it, since a replica Serve starts again reads its version here.
    Returns once it is up (a bad state file raises)."""
    stop_registry(pool)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(SwapRegistry).options(
        name=registry_name(pool), namespace=NAMESPACE, lifetime="detached",
        scheduling_strategy=here).remote(
            models, str(Path(state_path).resolve()) if state_path else None)
    ray.get(actor.versions.remote())
    return actor


def stop_registry(pool: str) -> None:
    try:
        ray.kill(ray.get_actor(registry_name(pool), namespace=NAMESPACE))
    except ValueError:  # no such actor: nothing to stop
        return


def registry(name: str):
    return ray.get_actor(name, namespace=NAMESPACE)


async def current_version(registry_actor: str, model: str) -> WeightVersion:
    return await registry(registry_actor).current.remote(model)


# --- 3/4. orchestration: from the driver (ModelPool) or from a replica (load_weights) ------------

class _ReplicaFailed(Exception):
    """A replica refused or failed a version (not one that merely died: Serve replaces those)."""


async def swap_model(registry_actor: str, model: str, checkpoint: str,
                     timeout_s: float = 600.0,
                     check: Callable[[str, str], None] = validate) -> int:
    """`check(checkpoint, base)` (the model's weight-sync backend's; disk: `validate`), then
    make `checkpoint` `model`'s new version on every replica; returns its number."""
    reg = registry(registry_actor)
    base = (await reg.history.remote(model))[0].path
    await asyncio.to_thread(check, checkpoint, base)  # file reads: keep a replica's loop free
    token = await reg.acquire.remote(model, timeout_s, timeout_s + 60)
    try:
        prev = await reg.current.remote(model)
        target = await reg.propose.remote(model, str(Path(checkpoint).resolve()))
        await _roll_to(reg, model, target, prev, timeout_s, new=True)
        return target.version
    finally:
        await reg.release.remote(model, token)


async def rollback_model(registry_actor: str, model: str, version: int | None = None,
                         timeout_s: float = 600.0) -> int:
    """Serve an earlier version again (by default the newest one below the live one)."""
    reg = registry(registry_actor)
    token = await reg.acquire.remote(model, timeout_s, timeout_s + 60)
    try:
        prev = await reg.current.remote(model)
        good = [v for v in await reg.history.remote(model) if v.failed is None]
        if version is None:
            older = [v for v in good if v.version < prev.version]
            if not older:
                raise SwapError(f"{model!r} serves v{prev.version}, its first version; "
                                "there is nothing earlier to roll back to")
            target = older[-1]
        else:
            target = next((v for v in good if v.version == version), None)
            if target is None:
                raise SwapError(f"{model!r} has no version {version} to roll back to; valid: "
                                f"{[v.version for v in good]}")
        if target.version != prev.version:
            # The files may have changed or gone since that version served.
            await asyncio.to_thread(validate, target.path, good[0].path)
            await reg.activate.remote(model, target.version)
            await _roll_to(reg, model, target, prev, timeout_s, new=False)
        return target.version
    finally:
        await reg.release.remote(model, token)


async def _roll_to(reg, model: str, target: WeightVersion, prev: WeightVersion,
                   timeout_s: float, new: bool) -> None:
    apps = await reg.apps.remote(model)
    try:
        await _converge_all(apps, model, target, timeout_s)
    except _ReplicaFailed as e:
        await reg.activate.remote(model, prev.version)
        if new:
            await reg.mark_failed.remote(model, target.version, str(e))
        try:
            await _converge_all(apps, model, prev, timeout_s)
        except _ReplicaFailed as again:
            raise SwapError(f"{model!r}: v{target.version} failed ({e}), and going back to "
                            f"v{prev.version} failed too: {again}") from None
        raise SwapError(f"{model!r}: swap to v{target.version} ({target.path}) failed: {e}; "
                        f"every replica is back on v{prev.version}") from None


async def _converge_all(apps: list[str], model: str, target: WeightVersion,
                        timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        async with asyncio.TaskGroup() as tg:  # one failure cancels the rest (then we undo all)
            for app in apps:
                tg.create_task(_converge(app, model, target, deadline))
    except ExceptionGroup as group:
        failed, other = group.split(_ReplicaFailed)
        if other is not None:
            raise other.exceptions[0] if len(other.exceptions) == 1 else other
        raise _ReplicaFailed("; ".join(str(e) for e in failed.exceptions)) from None


async def _converge(app: str, model: str, target: WeightVersion, deadline: float,
                    starting_grace_s: float = 60.0) -> None:
    """Broadcast `apply_version` to `app`'s replicas until each answers `target.version` and
    Serve counts no replica that did not answer. Idempotent on the replicas, so repeating a
    round only reaches the ones that missed it (just started, or not yet routable)."""
    from ray import serve
    from ray.exceptions import RayActorError

    handle = serve.get_app_handle(app)
    waiting_since = None
    while True:
        left = max(deadline - time.monotonic(), 1.0)
        try:
            results = await handle.broadcast("apply_version", model, target).results_async(
                timeout_s=left, return_exceptions=True)
        except TimeoutError as e:
            raise _ReplicaFailed(f"{app}: replicas did not answer in time ({e})") from None
        # A replica that died mid-round is Serve's to replace; its successor loads `target`.
        failed = [r for r in results if isinstance(r, BaseException)
                  and not isinstance(r, RayActorError)]
        if failed:
            raise _ReplicaFailed(f"{app}: " + "; ".join(f"{type(e).__name__}: {e}"
                                                         for e in failed[:3]))
        versions = [r for r in results if not isinstance(r, BaseException)]
        states = await asyncio.to_thread(_replica_states, app)
        if versions and set(versions) == {target.version} and \
                len(versions) >= states.get("RUNNING", 0):
            if not any(states.get(s) for s in _TRANSIENT):
                return
            # Starting replicas read the registry last thing in their constructor; wait for
            # them to answer, but not forever (one may wait for resources that never come).
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since > starting_grace_s:
                logger.warning("%s: replicas still starting after %gs (%s); they will load "
                               "v%d from the registry", app, starting_grace_s, states,
                               target.version)
                return
        if time.monotonic() > deadline:
            raise _ReplicaFailed(f"{app}: not every replica reached v{target.version} in time "
                                 f"(replica states {states}, answers {versions})")
        await asyncio.sleep(0.1)


def _replica_states(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        raise _ReplicaFailed(f"application {app!r} is not running")
    counts: dict[str, int] = {}
    for dep in status.deployments.values():
        for state, n in dep.replica_states.items():
            key = getattr(state, "value", str(state))
            counts[key] = counts.get(key, 0) + n
    return counts
