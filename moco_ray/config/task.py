"""A task by name, and where MoCo task files are read from."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from moco_ray.config.base import Frozen


class TaskSpec(Frozen):
    """A task by name: a MoCo task file, a JSONL file, a hub dataset, or a synthetic task."""

    name: str
    source: Literal["moco", "jsonl", "hf", "synthetic"] = "moco"
    path: str | None = Field(None, description="file/dir for moco and jsonl; dataset for hf")
    kind: str | None = Field(None, description="metric kind for jsonl/hf tasks")
    dev_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


def default_data_dir() -> Path:
    """Where MoCo task files live: $MOCO_RAY_DATA, else ../shared/data/moco beside the repo."""
    env = os.environ.get("MOCO_RAY_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "moco"
