"""Model paths: a pool model's `path` is a local directory, a hub name, or `zoo:<name>` (built
once by the zoo). `resolve_path` turns each into a local directory on the driver, before any
engine, trainer or merge opens it, so all of them read the same files.

Hub names are materialized once into the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub,
else Hugging Face's default; on a cluster, put it on storage every node sees), through
$HF_ENDPOINT (a mirror) when set. With $HF_HUB_OFFLINE set nothing is downloaded, and a model
missing from the cache is an error that names it and how to pre-fill the cache.
"""
from __future__ import annotations

import os
from pathlib import Path

from moco_ray.models.zoo import registry


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~"))


def resolve_path(path: str) -> str:
    """'zoo:<name>' -> built model dir; an existing local dir -> itself; a hub name -> its
    snapshot dir in the hub cache (downloaded once, see `materialize`)."""
    if path.startswith("zoo:"):
        return str(registry.build(path[len("zoo:"):]))
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if _looks_local(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    return str(materialize(path))


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
    """The directory holding a model's files (a local dir, or a hub name: see `materialize`)."""
    if Path(model).is_dir():
        return Path(model)
    return materialize(model)


# What an engine, a trainer or a merge reads of a hub model; the rest of a repo (other weight
# formats, images, ONNX exports) is not downloaded.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def hub_cache() -> str | None:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else None (Hugging Face's default). Read at call time:
    huggingface_hub reads its variables once, when it is imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def materialize(name: str) -> Path:
    """The local snapshot dir of hub model `name`, downloaded into `hub_cache()` the first time
    (through $HF_ENDPOINT when set); cached files only under $HF_HUB_OFFLINE."""
    # huggingface_hub takes a second to import, and only hub names need it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(name, cache_dir=cache, allow_patterns=HUB_FILES,
                                      local_files_only=_offline(),
                                      endpoint=os.environ.get("HF_ENDPOINT") or None))
    except HFValidationError:
        raise ValueError(f"model path {name!r} is neither a local directory, 'zoo:<name>' nor "
                         "a hub name ('org/name')") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = cache or "the default Hugging Face cache"
        raise FileNotFoundError(
            f"hub model {name!r} is not in {where} and could not be downloaded "
            f"({type(e).__name__}); pre-fill the cache where the hub is reachable: "
            f"`hf download {name} --cache-dir <that cache>` (then point HF_HUB_CACHE at it on "
            "every node), or set HF_ENDPOINT to a mirror") from None
