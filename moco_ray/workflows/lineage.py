"""`moco-ray lineage RUN_DIR [MODEL]`: the version tree of each model of an evolution run.

Read from the run dir alone: `swap_registry.json` (each model's versions, as the pool numbered
them), `manifest.json` (which stage produced what: `data_<g>` the SFT rows, `distill_<g>` the
checkpoints), `config.yaml` (the system strategy, recipe, row filter) and each checkpoint's
`moco_checkpoint.json` (base model, method, steps, loss, sha256 of every weight file). A version
is tied to the generation whose `distill_<g>` wrote its checkpoint dir; its parent is the
version whose weights its checkpoint was trained from (the manifest's `base_model`; without one,
the newest version of the generation before).

Paths in a run dir are the ones the run wrote (absolute, or relative to where it was started).
A path inside the run, `<prefix>/gen_<g>/...` where the prefix is one the manifest's own stage
outputs use (or ends in a part named like the run dir), is read from this run dir, so a moved,
renamed or copied run dir reads its own files; other paths (starting weights) are read as they
are.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from moco_ray.models.checkpoint import MANIFEST, CheckpointError, sha256_file, verify_checkpoint

# The files moco_ray.models.checkpoint hashes into a manifest (hashed here for dirs without one).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class SftData(BaseModel):
    path: str = Field(description="Parquet dataset of the SFT rows")
    rows: int


class ModelVersion(BaseModel):
    """One version of one model's weights and what produced it."""

    model: str
    version: int | None = Field(description="the pool's version number (swap registry); None: "
                                "distilled but never swapped in")
    path: str = Field(description="the weights dir")
    generation: int | None = Field(description="0: the starting weights; g: written by "
                                   "distill_g; None: swapped in outside the loop")
    parent: int | None = Field(None, description="version its training started from")
    strategy: str | None = Field(None, description="collaboration strategy whose dev records "
                                 "were distilled")
    recipe: str | None = None
    keep: str | None = None
    sft: SftData | None = None
    method: str | None = Field(None, description="training method (checkpoint manifest)")
    steps: int | None = None
    final_loss: float | None = None
    sha256: dict[str, str] = Field(default_factory=dict, description="weight file -> sha256")
    sha256_from: Literal["manifest", "computed", "not hashed", "missing"] = "missing"
    verified: str | None = Field(None, description="with verify: 'ok', or why the files do "
                                 "not match their manifest")
    live: bool = Field(False, description="the version the pool serves now")
    failed: str | None = Field(None, description="why its swap failed (it never served)")


def _gen_part(path: str) -> int | None:
    """Index of the first `gen_<g>` part of `path` after its first part, if any."""
    parts = Path(path).parts
    return next((i for i in range(1, len(parts)) if re.fullmatch(r"gen_\d+", parts[i])), None)


def run_prefixes(stages: dict) -> set[str]:
    """The dirs the run was in when it wrote its stage outputs (the part of each output path
    before `gen_<g>`)."""
    found: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and (i := _gen_part(x)) is not None:
            found.add(str(Path(*Path(x).parts[:i])))

    walk({k: v.get("output") for k, v in stages.items()})
    return found


def in_run(run_dir: Path, path: str, prefixes: set[str] = frozenset()) -> Path:
    """`path` as written by the run, read from `run_dir` when it points inside the run (its
    part before `gen_<g>` is one of `prefixes`, or ends in the run dir's name); else as is."""
    p = Path(path)
    i = _gen_part(path)
    if i is not None:
        before = Path(*p.parts[:i])
        if str(before) in prefixes or before.name == run_dir.name:
            return run_dir.joinpath(*p.parts[i:])
    return p


def weights_sha256(path: Path, verify: bool = False, hash_files: bool = True
                   ) -> tuple[dict[str, str], str, str | None]:
    """(weight file -> sha256, where it came from, verification result). From the checkpoint
    manifest when the dir has one (`verify` rehashes the files against it); else each weight
    file is hashed here (unless not `hash_files`: a large base model takes a while); a dir that
    is not there (a hub name, a deleted cache) has none."""
    manifest = path / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        checked = None
        if verify:
            try:
                verify_checkpoint(path)
                checked = "ok"
            except CheckpointError as e:
                checked = str(e)
        return dict(files), "manifest", checked
    if path.is_dir() and not hash_files:
        return {}, "not hashed", None
    if path.is_dir():
        files = {f.name: sha256_file(f) for f in sorted(path.iterdir())
                 if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)}
        return files, "computed", None
    return {}, "missing", None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}




def lineage(run_dir: str | Path, model: str | None = None, verify: bool = False,
            hash_files: bool = True) -> dict[str, list[ModelVersion]]:
    """{model: its versions, oldest first} for an evolution run dir (`model`: that one only).
    `hash_files=False` reads hashes from checkpoint manifests only (weights without one, such as
    the starting models, are not hashed)."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no manifest.json: not an evolution run dir "
                                "(`moco-ray evolve` writes one)")
    stages = _read_json(run_dir / "manifest.json").get("stages", {})
    registry = _read_json(run_dir / "swap_registry.json")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) \
        if (run_dir / "config.yaml").is_file() else {}
    system = (cfg.get("system") or {}).get("strategy")
    prefixes = run_prefixes(stages)

    def local(path: str) -> Path:
        return in_run(run_dir, path, prefixes)

    def same(a: str, b: str) -> bool:
        return local(a).resolve() == local(b).resolve()

    def done(stage: str) -> dict | None:
        entry = stages.get(stage, {})
        return entry.get("output") if entry.get("state") == "done" else None

    distilled: dict[str, dict[int, str]] = {}  # model -> generation -> checkpoint path
    for stage in stages:
        m = re.fullmatch(r"distill_(\d+)", stage)
        if m and done(stage):
            for name, path in done(stage)["checkpoints"].items():
                distilled.setdefault(name, {})[int(m[1])] = path
    history = registry.get("history", {})
    names = list(history) + [m for m in (p["name"] for p in cfg.get("pool", {}).get("models", [])
                                         if p.get("role", "member") == "member")
                             if m not in history]
    names += [m for m in distilled if m not in names]
    if model is not None:
        if model not in names:
            raise KeyError(f"no model {model!r} in {run_dir}; models: {names}")
        names = [model]

    out = {}
    for name in names:
        gens = distilled.get(name, {})
        # (version, path, failed) of every version the registry holds, then distilled
        # checkpoints it never got (a run stopped between distill and swap).
        known = [(v["version"], v["path"], v.get("failed")) for v in history.get(name, [])]
        known += [(None, p, None) for g, p in sorted(gens.items())
                  if not any(same(p, k[1]) for k in known)]
        if not known:  # no registry yet: the configured starting weights
            spec = next(p for p in cfg["pool"]["models"] if p["name"] == name)
            known = [(0, spec["path"], None)]
        live = registry.get("current", {}).get(name)
        versions = []
        for version, path, failed in known:
            gen = 0 if version == 0 else next(
                (g for g, p in gens.items() if same(p, path)), None)
            where = local(path)
            sha, source, checked = weights_sha256(where, verify, hash_files)
            info = _read_json(where / MANIFEST)
            node = ModelVersion(model=name, version=version, path=str(where), generation=gen,
                                sha256=sha, sha256_from=source, verified=checked,
                                live=version is not None and version == live, failed=failed,
                                method=info.get("method"), steps=info.get("steps"),
                                final_loss=info.get("final_loss"))
            if gen:
                sft = (done(f"data_{gen}") or {}).get("data", {}).get(name)
                node = node.model_copy(update={
                    "strategy": system, "recipe": cfg.get("recipe"), "keep": cfg.get("keep"),
                    "sft": SftData(path=str(local(sft["path"])), rows=sft["n"])
                    if sft else None})
            versions.append(node)
        out[name] = [v.model_copy(update={"parent": _parent(v, versions, same)})
                     for v in versions]
    return out


def _parent(v: ModelVersion, versions: list[ModelVersion], same) -> int | None:
    """The version `v` was trained from: its manifest's base model, else the newest served
    version of the generation before."""
    if not v.generation:
        return None
    base = _read_json(Path(v.path) / MANIFEST).get("base_model")
    ok = [w for w in versions if w.version is not None and w.failed is None and w is not v]
    if base:
        match = [w for w in ok if same(w.path, base)]
        if match:
            return match[-1].version
    before = [w for w in ok if w.generation is not None and w.generation < v.generation]
    return before[-1].version if before else None


def as_json(tree: dict[str, list[ModelVersion]]) -> dict[str, Any]:
    return {m: [v.model_dump(mode="json") for v in vs] for m, vs in tree.items()}


def _label(v: ModelVersion) -> str:
    ver = f"v{v.version}" if v.version is not None else "not swapped in"
    gen = {None: "outside the loop", 0: "starting weights"}.get(v.generation,
                                                               f"generation {v.generation}")
    bits = [ver, gen]
    if v.live:
        bits.append("live")
    if v.failed:
        bits.append(f"swap failed: {v.failed}")
    return ", ".join(bits)


def _details(v: ModelVersion) -> list[str]:
    lines = []
    if v.generation:
        lines.append(f"strategy {v.strategy} (recipe {v.recipe}, keep {v.keep})")
        lines.append(f"SFT rows {v.sft.rows} at {v.sft.path}" if v.sft else "SFT rows: unknown")
    if v.method:
        loss = f", final loss {v.final_loss:.4f}" if v.final_loss is not None else ""
        lines.append(f"{v.method}, {v.steps} steps{loss}")
    lines.append(f"path {v.path}")
    if v.sha256:
        lines += [f"sha256 {f}: {h} ({v.sha256_from})" for f, h in v.sha256.items()]
    else:
        lines.append("sha256: not hashed (no checkpoint manifest; `moco-ray lineage` hashes "
                     "the files)" if v.sha256_from == "not hashed"
                     else "sha256: none (weights dir not found)")
    if v.verified:
        lines.append(f"verified: {v.verified}")
    return lines


def walk(versions: list[ModelVersion]) -> list[tuple[int, ModelVersion]]:
    """(depth, version) in tree order: each version under its parent (a version whose parent
    is not among them at depth 0)."""
    numbers = {v.version for v in versions}
    kids: dict[int | None, list[ModelVersion]] = {}
    for v in versions:
        key = v.parent if v.parent in numbers and v.parent != v.version else None
        kids.setdefault(key, []).append(v)
    out: list[tuple[int, ModelVersion]] = []

    def add(v: ModelVersion, depth: int) -> None:
        out.append((depth, v))
        if v.version is not None:
            for k in kids.get(v.version, []):
                add(k, depth + 1)

    for v in kids.get(None, []):
        add(v, 0)
    return out


def rich_tree(tree: dict[str, list[ModelVersion]], title: str):
    """The lineage as a `rich.tree.Tree`: model -> starting weights -> each child version."""
    from rich.markup import escape
    from rich.tree import Tree

    root = Tree(escape(title))
    for name, versions in tree.items():
        stack = [root.add(f"[bold]{escape(name)}[/bold]")]
        for depth, v in walk(versions):
            del stack[depth + 1:]
            branch = stack[depth].add(f"[bold]{escape(_label(v))}[/bold]")
            for line in _details(v):
                branch.add(escape(line))
            stack.append(branch)
    return root


def markdown(tree: dict[str, list[ModelVersion]]) -> str:
    """The lineage as nested Markdown lists (for the report)."""
    lines: list[str] = []
    for name, versions in tree.items():
        lines.append(f"- **{name}**")
        for depth, v in walk(versions):
            pad = "  " * (depth + 1)
            lines.append(f"{pad}- **{_label(v)}**")
            lines += [f"{pad}  - {d}" for d in _details(v)]
    return "\n".join(lines)
