"""Model paths: a pool model's `path` is a local directory, a hub name (passed through
untouched), or `zoo:<name>` (built once by the zoo)."""
from __future__ import annotations

from pathlib import Path

from moco_ray.models.zoo import registry


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~"))


def resolve_path(path: str) -> str:
    """'zoo:<name>' -> built model dir; an existing local dir -> itself; else unchanged (hub)."""
    if path.startswith("zoo:"):
        return str(registry.build(path[len("zoo:"):]))
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    return path


def check_path(path: str) -> str | None:
    """What is wrong with a model path, or None. Builds nothing (runs on the driver)."""
    if path.startswith("zoo:"):
        name = path[len("zoo:"):]
        if registry.lookup(name) is None:
            return f"unknown zoo recipe {name!r} in {path!r}; valid: {registry.recipe_names()}"
        return None
    if _looks_local(path):
        local = Path(path).expanduser()
        if not local.is_dir():
            return f"model directory {path!r} does not exist"
        if not (local / "config.json").is_file():
            return f"model directory {path!r} has no config.json (not a saved model)"
    return None


def local_model_dir(model: str) -> Path:
    """The directory holding a model's files (a local dir, or a hub name already in the cache)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download  # only for hub names: a slow import

    return Path(snapshot_download(model, local_files_only=True))
