"""Weight-sync backends (pool/swap/sync.py): the registry of backends, the disk backend's two
steps, and the config check that names an unknown backend before anything starts."""
from __future__ import annotations

import asyncio

import pytest

from moco_ray.config import ConfigError
from moco_ray.pool.swap.hotswap import SwapError, WeightVersion
from moco_ray.pool.swap.sync import (
    DiskReload,
    register_weight_sync,
    weight_sync,
    weight_sync_names,
)
from moco_ray.workflows.load import parse_config


class _Engine:
    """Records what it was asked to load (the disk backend's only call into an engine)."""

    def __init__(self):
        self.loaded: list[str] = []

    async def load_weights(self, path: str) -> int:
        self.loaded.append(path)
        return len(self.loaded)


def test_disk_is_the_default_backend_and_unknown_names_list_the_valid_ones():
    assert isinstance(weight_sync(), DiskReload) and "disk" in weight_sync_names()
    assert isinstance(weight_sync("moco_ray.pool.swap.sync:DiskReload"), DiskReload)
    with pytest.raises(ValueError, match=r"unknown weight-sync backend 'nccl'; valid: \['disk'"):
        weight_sync("nccl")
    with pytest.raises(ValueError, match="already registered"):
        register_weight_sync(DiskReload)


def test_disk_backend_refuses_a_missing_dir_and_loads_the_target_path(tmp_path):
    sync = weight_sync("disk")
    with pytest.raises(SwapError, match="no such directory"):
        sync.check(str(tmp_path / "nope"), str(tmp_path))
    engine = _Engine()
    asyncio.run(sync.load(engine, WeightVersion(version=3, path="/ckpt/v3")))
    assert engine.loaded == ["/ckpt/v3"]


def test_config_names_an_unknown_backend():
    raw = {"pool": {"models": [{"name": "a", "path": "zoo:tiny", "weight_sync": "nccl"}]},
           "tasks": [{"name": "max", "source": "synthetic"}],
           "jobs": [{"strategy": "single"}]}
    with pytest.raises(ConfigError, match=r"pool\.models\.0\.weight_sync: unknown weight-sync backend 'nccl'"):
        parse_config(raw)
