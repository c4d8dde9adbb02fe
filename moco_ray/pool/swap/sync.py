"""Weight-sync backends: how a new weight version reaches each replica of a pool model.

`WeightSync` is an interface, not a base class to inherit code from. A backend does two things,
and `hotswap` does everything around them (versions, the registry, pausing each replica behind
its `WeightGate`, broadcast to every replica, rollback):

  check(source, live_dir)   refuse a source before anything changes (raise `SwapError`)
  load(engine, target)      put version `target` into one replica's engine (the replica is
                            paused; in-flight requests have drained)

One backend ships: `disk` (a version is a checkpoint dir every replica can read; each replica's
engine reloads it through `Engine.load_weights`, which also resets its prefix cache). A
collective backend (NCCL broadcast from a trainer, CUDA IPC on one node) would plug in here: its
`check` would compare the sender's tensor names and shapes, its `load` receive them in place.
"""
from __future__ import annotations

import asyncio
from typing import ClassVar, Protocol

from moco_ray.engines.base import Engine
from moco_ray.plugins import load_object
from moco_ray.pool.swap.hotswap import WeightVersion, validate


class WeightSync(Protocol):
    name: ClassVar[str]

    def check(self, source: str, live_dir: str) -> None:
        """Raise `SwapError` naming every reason `source` cannot replace `live_dir`'s weights."""
        ...

    async def load(self, engine: Engine, target: WeightVersion) -> None:
        """Serve `target` from `engine` (this replica only)."""
        ...


class DiskReload:
    """A version is a checkpoint directory on storage every replica reads (on a cluster: shared
    storage); each replica's engine reloads from it."""

    name: ClassVar[str] = "disk"

    def check(self, source: str, live_dir: str) -> None:
        validate(source, live_dir)

    async def load(self, engine: Engine, target: WeightVersion) -> None:
        await engine.load_weights(target.path)


_BACKENDS: dict[str, type] = {"disk": DiskReload}


def register_weight_sync(cls: type) -> None:
    """Add a backend under `cls.name`; a name already taken is an error."""
    if cls.name in _BACKENDS:
        raise ValueError(f"weight-sync backend {cls.name!r} is already registered")
    _BACKENDS[cls.name] = cls


def weight_sync_names() -> list[str]:
    return sorted(_BACKENDS)


def weight_sync_class(name: str) -> type:
    """The backend registered as `name`, or the class 'package.module:Class' names (imported
    here, so every replica finds it without a registration of its own)."""
    if ":" in name and name not in _BACKENDS:
        return load_object(name)
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown weight-sync backend {name!r}; valid: "
                         f"{weight_sync_names()} or 'package.module:Class'") from None


def weight_sync(name: str = "disk") -> WeightSync:
    return weight_sync_class(name)()


async def check_off_loop(sync: WeightSync, source: str, live_dir: str) -> None:
    """`sync.check` in a worker thread (it reads files and hashes weights)."""
    await asyncio.to_thread(sync.check, source, live_dir)
