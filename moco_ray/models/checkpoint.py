"""What a checkpoint dir is and how to check one before any engine loads it.

A checkpoint dir is either a plain model dir (config.json, *.safetensors, tokenizer: what vLLM
and transformers load) or a peft adapter dir (adapter_config.json, adapter_model.safetensors),
plus `moco_checkpoint.json`: base model, method, steps, losses and the sha256 of every weight
file, so a loader can refuse a truncated or altered checkpoint before swapping it in. Trainers
write them (`moco_ray.training.checkpoint`); the pool and the merges read them.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "moco_checkpoint.json"
FORMAT = "moco_checkpoint/1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class CheckpointError(ValueError):
    """A checkpoint dir that is missing files or does not match its manifest."""


class CheckpointInfo(BaseModel):
    """One distilled model, as `distill_all` returns it."""

    model_config = ConfigDict(frozen=True)
    model: str = Field(description="model name from the job")
    path: str = Field(description="checkpoint dir (plain model dir or peft adapter dir)")
    base_model: str = Field(description="the model dir training started from")
    method: str
    output: str
    steps: int
    final_loss: float
    losses: list[float] = Field(description="global loss after every optimizer step")
    seconds: float = Field(description="wall time of this model's fit, driver side; in a run "
                           "that trains several models in turn, its share: from the previous "
                           "model's end (the run's start for the first) to its own end (the "
                           "run's end for the last)")
    train_entered: float = Field(description="epoch time rank 0 began (before reading its data, "
                                 "loading the model and DeepSpeed init)")
    train_started: float = Field(description="epoch time the first step began (rank 0)")
    train_finished: float = Field(description="epoch time the last step ended (rank 0)")
    resumed_from: int | None = Field(
        None, description="after a restart of its Ray Train run (a worker died): the steps its "
        "resume checkpoint had done; None: trained without a break")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every weight file in `out` and write the manifest next to them."""
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir())
             if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)}
    if not files:
        raise CheckpointError(f"{out} has no weight files to put in the manifest")
    manifest = {"format": FORMAT, **info, "files": files,
                "created": datetime.now(UTC).isoformat(), "created_unix": time.time()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint dir after checking it: manifest present and readable, the
    files a loader needs present, every weight file's sha256 as recorded. CheckpointError else."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{root} has no {MANIFEST}; it was not written by moco_ray.training "
                              "(or the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON ({e}); the checkpoint is damaged") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} has format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    needed = "adapter_config.json" if manifest.get("output") == "adapter" else "config.json"
    if not (root / needed).is_file():
        raise CheckpointError(f"{root} has no {needed}; a loader cannot open it")
    for name, digest in manifest.get("files", {}).items():
        f = root / name
        if not f.is_file():
            raise CheckpointError(f"{root} lacks weight file {name} listed in its manifest")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f} does not match the sha256 in {MANIFEST}; the file was "
                                  "altered or truncated after saving")
    return manifest


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers of a checkpoint dir (reads no data)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint {str(path)!r} has no *.safetensors files; "
                         "save it with save_pretrained (safetensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        except SafetensorError as e:
            raise ValueError(f"checkpoint file {str(f)!r} is not valid safetensors: {e}") from None
    return shapes


def validate_checkpoint(reference: dict[str, tuple[int, ...]], path: str | Path) -> None:
    """Raise ValueError naming every tensor of `path` that is missing, unexpected, or of the
    wrong shape against `reference` (the checkpoint the engine started from)."""
    got = checkpoint_shapes(path)
    # A tied lm_head may or may not be saved; its absence or presence alone is no mismatch.
    optional = {"lm_head.weight"} if "model.embed_tokens.weight" in reference else set()
    problems = [f"missing tensor {k!r}" for k in sorted(set(reference) - set(got) - optional)]
    problems += [f"unexpected tensor {k!r}" for k in sorted(set(got) - set(reference) - optional)]
    problems += [f"tensor {k!r} has shape {list(got[k])}, the model expects {list(reference[k])}"
                 for k in sorted(set(got) & set(reference)) if got[k] != reference[k]]
    if problems:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model ({len(problems)} "
                         f"problem(s)); old weights kept: " + "; ".join(problems[:10]))
