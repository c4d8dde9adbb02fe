"""Shared code of the weight-level strategies: merge math, reading members, writing candidates,
and scoring candidates on dev through the pool's scratch deployment.

Every weight-level method makes candidate weights (a soup, a DARE-TIES merge, a swarm particle,
a LoraHub composition, an extrapolation), writes each to its own directory (config, tokenizer,
`model.safetensors`) and scores it on dev by generating with the scratch deployment, which
hot-swaps each candidate dir in (one engine reload, never a restart or a new engine). The chosen
candidate then answers the test examples through the same scratch.

Math is float32 torch on CPU, over whole state dicts held in memory (the members' and the
candidates'); a candidate is saved in the members' own dtype. Candidate dirs live under the job's
`ctx.workdir` ($MOCO_RAY_WORKDIR, else the system temp dir): it must be readable by the node(s)
running the scratch replicas. On one node, a tmpfs such as /dev/shm makes the write and the
reload faster (set MOCO_RAY_WORKDIR=/dev/shm/moco); on a cluster use shared storage. Candidates
that are no longer needed are deleted as the search goes (unless `keep_candidates`).
"""
from __future__ import annotations

import asyncio
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field

from moco_ray import models
from moco_ray.strategies.base import ExampleContext, StrategyContext
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example

StateDict = dict[str, torch.Tensor]
# Files of a model dir that are weights (rewritten per candidate) or bookkeeping that would not
# match the candidate (the distill manifest hashes the member's own weight files).
_SKIP_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|.*\.index\.json$|"
                         r"^moco_checkpoint\.json$")


class WeightFields(SamplingFields):
    """Fields every weight-level strategy takes besides sampling."""

    dev_size: int | None = Field(None, ge=1, description="dev examples each candidate is scored "
                                 "on (None: all of dev)")
    keep_candidates: bool = Field(False, description="keep every candidate dir under the job's "
                                  "workdir (default: only the chosen one survives fit)")


# --- merge math (pure functions over state dicts) ----------------------------------------------

def _float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def linear(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_i w_i * state_i, tensor by tensor (a uniform soup when the weights are 1/n). Tensors
    that are not floating point are taken from the first state."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"linear merge needs one weight per state: {len(states)} states, "
                         f"{len(weights)} weights")
    out: StateDict = {}
    for k, t0 in states[0].items():
        if not _float(t0):
            out[k] = t0
            continue
        acc = torch.zeros_like(t0, dtype=torch.float32)
        for w, s in zip(weights, states):
            if w != 0.0:
                acc.add_(s[k].float(), alpha=float(w))
        out[k] = acc
    return out


def uniform_soup(states: Sequence[StateDict]) -> StateDict:
    """The uniform soup: the element-wise mean of the states (Wortsman et al., 2022)."""
    return linear(states, [1.0 / len(states)] * len(states))


def delta(state: StateDict, base: StateDict) -> StateDict:
    """Task vector state - base."""
    return {k: (t.float() - base[k].float()) if _float(t) else t for k, t in state.items()}


def add(a: StateDict, b: StateDict, scale: float = 1.0) -> StateDict:
    """a + scale * b."""
    return {k: (t.float() + scale * b[k].float()) if _float(t) else t for k, t in a.items()}


def extrapolate(theta1: StateDict, theta0: StateDict, alpha: float) -> StateDict:
    """ExPO: theta1 + alpha * (theta1 - theta0) (Zheng et al., 2024)."""
    return {k: (t.float() + alpha * (t.float() - theta0[k].float())) if _float(t) else t
            for k, t in theta1.items()}


def dare(t: torch.Tensor, density: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """DARE (Yu et al., 2024): drop each entry of a delta with probability 1 - density and
    rescale the kept ones by 1/density, so the expectation of every entry is unchanged."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"DARE density must be in (0, 1], got {density}")
    if density == 1.0:
        return t
    keep = torch.rand(t.shape, generator=gen) < density
    return torch.where(keep, t / density, torch.zeros_like(t))


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim (Yadav et al., 2023): keep the round(density * n) entries of largest
    magnitude, zero the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES trim density must be in (0, 1], got {density}")
    if density == 1.0:
        return t
    k = round(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    flat = t.reshape(-1)
    idx = flat.abs().topk(k).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(t.shape)


def ties_combine(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES elect + disjoint merge of (already sparsified) deltas: the elected sign of each entry
    is the sign of the weighted sum of the deltas; only deltas that agree with it contribute, as
    their weighted mean (weights renormalised over the agreeing deltas, mergekit's
    `normalize: true`). Entries where nothing agrees stay 0."""
    stack = torch.stack([d.float() for d in deltas])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    w = w.view(-1, *[1] * (stack.dim() - 1))
    weighted = stack * w
    elected = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(stack) == elected) & (elected != 0)
    num = (weighted * agree).sum(dim=0)
    den = (w * agree).sum(dim=0)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)),
                       torch.zeros_like(num))


def dare_ties(base: StateDict, states: Sequence[StateDict], weights: Sequence[float],
              density: float = 1.0, trim_density: float = 1.0, seed: int = 0) -> StateDict:
    """DARE-TIES: per tensor, each model's delta from `base` is DARE-sparsified (`density`),
    optionally TIES-trimmed by magnitude (`trim_density`; 1.0 = mergekit's dare_ties, which
    trims nothing), then signs are elected and the agreeing deltas averaged with `weights`;
    the result is base + merged delta. Seeded, so the same call gives the same weights."""
    gen = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for k in sorted(base):  # a fixed order keeps DARE's random masks reproducible
        b = base[k]
        if not _float(b):
            out[k] = b
            continue
        ds = [trim(dare(s[k].float() - b.float(), density, gen), trim_density) for s in states]
        out[k] = b.float() + ties_combine(ds, weights)
    return out


def softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# --- reading members ---------------------------------------------------------------------------

def local_dir(path: str) -> Path:
    """A model dir on this node for a weights path (a local dir, or a hub name in the cache)."""
    return models.local_model_dir(path)


def load_state(path: str | Path) -> tuple[StateDict, dict[str, torch.dtype]]:
    """Every tensor of a model dir's *.safetensors as float32 (and each one's saved dtype)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model dir {str(path)!r} has no *.safetensors weight files; weight-level "
                         "strategies read safetensors checkpoints (save_pretrained)")
    state: StateDict = {}
    dtypes: dict[str, torch.dtype] = {}
    for f in files:
        for k, t in load_file(str(f)).items():
            dtypes[k] = t.dtype
            state[k] = t.float() if _float(t) else t
    return state, dtypes


def check_same_architecture(shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Raise ValueError naming every difference in tensor names or shapes between the models
    (name -> tensor name -> shape) and the first of them."""
    names = list(shapes)
    ref_name, ref = names[0], shapes[names[0]]
    problems = []
    for n in names[1:]:
        s = shapes[n]
        missing, extra = sorted(set(ref) - set(s)), sorted(set(s) - set(ref))
        if missing:
            problems.append(f"{n!r} lacks {len(missing)} tensor(s) of {ref_name!r}, e.g. "
                            f"{missing[:3]}")
        if extra:
            problems.append(f"{n!r} has {len(extra)} tensor(s) {ref_name!r} lacks, e.g. "
                            f"{extra[:3]}")
        diff = [k for k in sorted(set(ref) & set(s)) if tuple(ref[k]) != tuple(s[k])]
        problems += [f"tensor {k!r} is {list(s[k])} in {n!r} but {list(ref[k])} in "
                     f"{ref_name!r}" for k in diff[:3]]
    if problems:
        raise ValueError("weight-level strategies merge models of one architecture (same tensor "
                         "names and shapes); these differ: " + "; ".join(problems)
                         + ". Use members (and base) of one architecture, e.g. fine-tunes of "
                         "one base model")


@dataclass
class Members:
    """The job's models as weights: dir, float32 state and saved dtypes per name, plus an
    optional base. `template` is the dir whose config and tokenizer candidates copy."""

    names: list[str]
    dirs: dict[str, str]
    states: dict[str, StateDict]
    dtypes: dict[str, torch.dtype]
    template: str
    base_name: str | None = None
    base: StateDict | None = None

    def ordered(self, names: Sequence[str] | None = None) -> list[StateDict]:
        return [self.states[n] for n in (names or self.names)]


async def resolve_weights(ctx: StrategyContext, ref: str) -> str:
    """A weights dir for `ref`: a pool member's current weights, a 'zoo:<name>' model, or a
    local model dir."""
    if ref in ctx.pool.models:
        return str(local_dir(await ctx.pool.weights_path(ref)))
    if ref.startswith("zoo:"):

        return await asyncio.to_thread(models.resolve_path, ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        return str(p)
    raise ValueError(f"base {ref!r} is not a pool member ({ctx.pool.models}), a 'zoo:<name>' "
                     "model or an existing model dir; name one of those")


async def load_members(ctx: StrategyContext, base: str | None = None,
                       min_models: int = 1, who: str = "this strategy") -> Members:
    """Read the job's members' current weights (and `base`, if given) and check they share one
    architecture."""
    ctx.require_scratch(who)  # before reading any weights: fail fast without one
    if len(ctx.models) < min_models:
        raise ValueError(f"{who} needs at least {min_models} models, the job has {ctx.models}")
    dirs = {m: str(local_dir(await ctx.pool.weights_path(m))) for m in ctx.models}
    base_dir = await resolve_weights(ctx, base) if base is not None else None

    def read():
        loaded = {m: load_state(d) for m, d in dirs.items()}
        if base in loaded:  # a job model as the base: share its tensors, read it once
            b = loaded[base][0]
        else:
            b = load_state(base_dir)[0] if base_dir is not None else None
        shapes = {m: {k: tuple(t.shape) for k, t in s.items()} for m, (s, _) in loaded.items()}
        if b is not None and base not in loaded:
            shapes[f"base {base}"] = {k: tuple(t.shape) for k, t in b.items()}
        check_same_architecture(shapes)
        return loaded, b

    loaded, b = await asyncio.to_thread(read)
    return Members(names=list(ctx.models), dirs=dirs,
                   states={m: s for m, (s, _) in loaded.items()},
                   dtypes=loaded[ctx.models[0]][1], template=dirs[ctx.models[0]],
                   base_name=base, base=b)


# --- writing candidates ------------------------------------------------------------------------

def write_candidate(state: StateDict, template: str | Path, out: str | Path,
                    dtypes: dict[str, torch.dtype] | None = None) -> str:
    """A loadable model dir at `out`: the template's config, tokenizer and other non-weight
    files plus `model.safetensors` with `state` (cast to `dtypes` where given). Written to a
    temp dir and renamed, so a reader never sees half a candidate."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"candidate dir {out} exists; each candidate needs a fresh dir "
                              "(the scratch swaps by path)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in Path(template).iterdir():
        if f.is_file() and not _SKIP_FILES.match(f.name):
            shutil.copy2(f, tmp / f.name)
    dtypes = dtypes or {}
    tensors = {k: t.to(dtypes.get(k, t.dtype)).contiguous() for k, t in state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    return str(out)


# --- scoring candidates through the scratch ------------------------------------------------------

@dataclass
class Scored:
    label: str
    path: str
    score: float
    written: bool  # made by this job (deletable), not a member's own dir


@dataclass
class Candidates:
    """Writes candidates under the job's workdir and scores each on dev through the scratch
    (cached by dir: a dir is scored once). `history` lists every scored candidate in order."""

    ctx: StrategyContext
    dev: DevSplit
    params: WeightFields
    strategy: str
    members: Members | None = None
    history: list[Scored] = field(default_factory=list)
    _scores: dict[str, float] = field(default_factory=dict)
    _root: Path | None = None
    _written: int = 0  # candidates written so far (numbers their dirs)

    def __post_init__(self):
        self.ctx.require_scratch(self.strategy)

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(self.ctx.workdir) / self.strategy
            self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    async def write(self, state: StateDict, label: str) -> str:
        if self.members is None:
            raise RuntimeError("Candidates.write needs the members (template and dtypes)")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80]
        out = self.root / f"{self._written:04d}-{safe}"
        self._written += 1
        return await asyncio.to_thread(write_candidate, state, self.members.template, out,
                                       self.members.dtypes)

    async def score_dir(self, path: str, label: str, written: bool = False) -> float:
        """Mean dev score of the weights at `path`, generated by the scratch."""
        if path in self._scores:
            return self._scores[path]
        p = self.params

        async def one(ectx: ExampleContext, ex: Example) -> float:
            prompt = self.ctx.task.prompt(ex)
            [g] = await ectx.generate_with(path, prompt, p.sampling(self.ctx.task, ectx.rng),
                                           step=f"dev:{label}")
            return await asyncio.to_thread(self.ctx.task.score, g.text, ex)

        scores = await over_dev(self.ctx, self.dev, p.dev_size, one)
        score = sum(scores) / len(scores)
        self._scores[path] = score
        self.history.append(Scored(label, path, score, written))
        return score

    async def score_state(self, state: StateDict, label: str) -> tuple[str, float]:
        """Write `state` as a candidate, score it; (dir, score)."""
        path = await self.write(state, label)
        return path, await self.score_dir(path, label, written=True)

    def prune(self, keep: set[str] | Sequence[str]) -> None:
        """Delete the candidate dirs this job wrote, except `keep` (no-op with keep_candidates)."""
        if self.params.keep_candidates:
            return
        keep = set(keep)
        for s in self.history:
            if s.written and s.path not in keep:
                shutil.rmtree(s.path, ignore_errors=True)

    def summary(self) -> list[dict]:
        return [{"label": s.label, "score": s.score} for s in self.history]


def require_fitted(strategy, key: str = "weights") -> str:
    if key not in strategy.fitted:
        raise RuntimeError(f"{strategy.name} needs fit(dev) first: it chooses its merged "
                           "weights on dev")
    return strategy.fitted[key]


async def answer_with(ectx: ExampleContext, weights: str, params: WeightFields) -> str:
    """The chosen weights' answer to the example, generated by the scratch."""
    prompt = ectx.task.prompt(ectx.example)
    [g] = await ectx.generate_with(weights, prompt, params.sampling(ectx.task, ectx.rng),
                                   step="answer")
    return g.text
