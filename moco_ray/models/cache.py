"""Where moco_ray keeps what it builds on a node (zoo models, tokenizers)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MOCO_RAY_CACHE, else ~/.cache/moco_ray."""
    env = os.environ.get("MOCO_RAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moco_ray"
