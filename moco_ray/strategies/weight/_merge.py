"""Shared code of the weight-level strategies: merge math, streaming merges over model dirs,
reading members, and scoring candidates on dev through the pool's scratch deployment.

Every weight-level method makes candidate weights (a soup, a DARE-TIES merge, a swarm particle,
a LoraHub composition, an extrapolation), writes each to its own directory (the members' config,
tokenizer and other non-weight files plus safetensors weights) and scores it on dev by
generating with the scratch deployment, which hot-swaps each candidate dir in (one engine
reload, never a restart or a new engine). The chosen candidate then answers the test examples
through the same scratch.

Streaming. No model is held whole in memory: every state (a member, the base, a candidate, a
swarm particle or velocity) is a model dir of safetensors on disk, and a merge is a function of
one tensor name and that tensor from each input dir (`stream_merge`). It reads one tensor at a
time from each input (`safetensors.safe_open`, one handle per read, so the file's memory map is
released with the tensor), upcasts it to float32, computes, casts the result to the output's
dtype (a candidate: the members' own dtype per tensor) and buffers it until its output shard is
complete. Outputs are written as transformers writes them: `model.safetensors` when the whole
state fits one shard of `SHARD_BYTES`, else `model-0000k-of-0000n.safetensors` shards plus
`model.safetensors.index.json`; the engines load both (HFEngine reads every *.safetensors of the
dir, vLLM the files the index lists). Peak memory of a merge is about one tensor (float32) per
distinct input dir plus the merge's temporaries for that tensor plus one shard per output, never
whole models. Tensors that are not floating point are copied from the first input. The
architecture check compares tensor names and shapes from the safetensors headers (no data read).

DARE's random masks come from a generator seeded per tensor, by a hash of (seed, tensor name)
(`tensor_seed`), so a merge gives the same weights whatever order its tensors are visited in
(in memory or streamed, sharded or not).

mergekit (LGPL, installable) streams merges too, but is not used: its DARE masks draw from
torch's global RNG (not reproducible per tensor); it merges models it knows the architecture
of, through a YAML config per merge, while Model Swarms needs one pass over velocity dirs (not
models) that writes three outputs (velocity, position, candidate); and it is a large
dependency (a CLI, its own config schema and architecture registry) for the few lines of tensor
math here.

Candidate dirs live under the job's `ctx.workdir` ($MOCO_RAY_WORKDIR, else the system temp dir):
it must be readable by the node(s) running the scratch replicas (shared storage on a cluster).
On one node, a tmpfs such as /dev/shm makes the write and the reload faster (set
MOCO_RAY_WORKDIR=/dev/shm/moco), at the cost of RAM. Candidates that are no longer needed are
deleted as the search goes (unless `keep_candidates`). Candidates are scored on dev with greedy
decoding (temperature 0), as the reference scores weight candidates, whatever the job's
sampling settings for answering test (`scoring_params`).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field

from moco_ray import models
from moco_ray.records import SamplingParams
from moco_ray.strategies.base import ExampleContext, StrategyContext
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example, Task

StateDict = dict[str, torch.Tensor]
# Largest output shard, in bytes (transformers' save_pretrained shards the same way; a tensor
# larger than this gets a shard of its own). Read at call time, so a test can lower it.
SHARD_BYTES = 1 << 30
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a model dir that are weights (rewritten per candidate) or bookkeeping that would not
# match the candidate (the distill manifest hashes the member's own weight files).
_SKIP_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt)$|.*\.index\.json$|"
                         r"^moco_checkpoint\.json$")
# safetensors header dtype -> torch dtype
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


class WeightFields(SamplingFields):
    """Fields every weight-level strategy takes besides sampling."""

    dev_size: int | None = Field(None, ge=1, description="dev examples each candidate is scored "
                                 "on (None: all of dev)")
    keep_candidates: bool = Field(False, description="keep every candidate dir under the job's "
                                  "workdir (default: only the chosen one survives fit)")


# --- merge math, per tensor (float32) and over in-memory state dicts ----------------------------

def _float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def combine(ts: Sequence[torch.Tensor | None], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * t_i in float32, adding in order; terms with weight 0 or tensor None (a zero
    tensor) are skipped. At least one tensor must be given."""
    if len(ts) != len(weights):
        raise ValueError(f"linear merge needs one weight per tensor: {len(ts)} tensors, "
                         f"{len(weights)} weights")
    ref = next((t for t in ts if t is not None), None)
    if ref is None:
        raise ValueError("linear merge of no tensors")
    acc = torch.zeros_like(ref, dtype=torch.float32)
    for w, t in zip(weights, ts):
        if w != 0.0 and t is not None:
            acc.add_(t.float(), alpha=float(w))
    return acc


def linear(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_i w_i * state_i, tensor by tensor (a uniform soup when the weights are 1/n). Tensors
    that are not floating point are taken from the first state."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"linear merge needs one weight per state: {len(states)} states, "
                         f"{len(weights)} weights")
    return {k: combine([s[k] for s in states], weights) if _float(t0) else t0
            for k, t0 in states[0].items()}


def uniform_soup(states: Sequence[StateDict]) -> StateDict:
    """The uniform soup: the element-wise mean of the states (Wortsman et al., 2022)."""
    return linear(states, [1.0 / len(states)] * len(states))


def delta(state: StateDict, base: StateDict) -> StateDict:
    """Task vector state - base."""
    return {k: (t.float() - base[k].float()) if _float(t) else t for k, t in state.items()}


def add(a: StateDict, b: StateDict, scale: float = 1.0) -> StateDict:
    """a + scale * b."""
    return {k: (t.float() + scale * b[k].float()) if _float(t) else t for k, t in a.items()}


def extrapolate_tensor(t1: torch.Tensor, t0: torch.Tensor, alpha: float) -> torch.Tensor:
    """ExPO on one tensor: t1 + alpha * (t1 - t0)."""
    return t1.float() + alpha * (t1.float() - t0.float())


def extrapolate(theta1: StateDict, theta0: StateDict, alpha: float) -> StateDict:
    """ExPO: theta1 + alpha * (theta1 - theta0) (Zheng et al., 2024)."""
    return {k: extrapolate_tensor(t, theta0[k], alpha) if _float(t) else t
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


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's random draws: a hash of the job seed and the tensor name, so
    the draws do not depend on the order tensors are visited in."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid torch seed


def dare_ties_tensor(name: str, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                     weights: Sequence[float], density: float = 1.0, trim_density: float = 1.0,
                     seed: int = 0) -> torch.Tensor:
    """DARE-TIES of one tensor: each model's delta from `base` is DARE-sparsified (`density`;
    masks from a generator seeded by `tensor_seed(seed, name)`, drawn model by model), optionally
    TIES-trimmed by magnitude (`trim_density`; 1.0 = mergekit's dare_ties, which trims nothing),
    then signs are elected and the agreeing deltas averaged with `weights`; base + merged delta."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    b = base.float()
    ds = [trim(dare(t.float() - b, density, gen), trim_density) for t in tensors]
    return b + ties_combine(ds, weights)


def dare_ties(base: StateDict, states: Sequence[StateDict], weights: Sequence[float],
              density: float = 1.0, trim_density: float = 1.0, seed: int = 0) -> StateDict:
    """DARE-TIES over whole state dicts (`dare_ties_tensor` per tensor; integer tensors are
    the base's). Seeded per tensor, so the same call gives the same weights, in memory or
    streamed."""
    return {k: dare_ties_tensor(k, b, [s[k] for s in states], weights, density, trim_density,
                                seed) if _float(b) else b
            for k, b in base.items()}


def softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# --- model dirs, read one tensor at a time -------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class WeightsDir:
    """The safetensors weights of a model dir, known from the files' headers (no tensor data is
    read until `read`). With `model.safetensors.index.json`, the files it lists; else every
    *.safetensors of the dir. `tensors` keeps the files' order, then each header's."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = _scan(self.path)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: i.shape for k, i in self.tensors.items()}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: i.dtype for k, i in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its saved dtype. A handle per read: the file's memory map is dropped
        with the tensor, so reading a whole model tensor by tensor keeps memory at one tensor."""
        from safetensors import safe_open

        with safe_open(self.tensors[name].file, framework="pt") as f:
            return f.get_tensor(name)

    def __repr__(self) -> str:
        return f"WeightsDir({str(self.path)!r})"


def _scan(path: Path) -> dict[str, TensorInfo]:
    from safetensors import SafetensorError, safe_open

    index = path / INDEX_FILE
    if index.is_file():
        try:
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a 'weight_map' of tensor "
                             f"name -> file): {e}") from None
        files = [path / f for f in listed]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists weight files the dir lacks: {missing}")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model dir {str(path)!r} has no *.safetensors weight files; weight-level "
                         "strategies read safetensors checkpoints (save_pretrained)")
    out: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    sl = sf.get_slice(k)
                    code = sl.get_dtype()
                    if code not in _DTYPES:
                        raise ValueError(f"tensor {k!r} of {f} has dtype {code}, which weight "
                                         f"merges do not handle ({sorted(_DTYPES)})")
                    if k in out:
                        raise ValueError(f"tensor {k!r} is in both {out[k].file} and {f}")
                    out[k] = TensorInfo(str(f), tuple(sl.get_shape()), _DTYPES[code])
        except SafetensorError as e:
            raise ValueError(f"weight file {str(f)!r} is not valid safetensors: {e}") from None
    return out


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


# --- streaming merges --------------------------------------------------------------------------

# fn(tensor name, that tensor of each input as float32) -> one tensor per output
TensorFn = Callable[[str, list[torch.Tensor]],
                    torch.Tensor | Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Output:
    """One output dir of a merge: its path (must not exist), the dtype each floating-point
    tensor is saved in (None: float32, for state that is math, not a model to serve), and a
    template dir whose non-weight files (config, tokenizer, ...) it copies (None: weights only)."""

    path: Path
    dtypes: Mapping[str, torch.dtype] | None = None
    template: Path | None = None


class _ShardWriter:
    """Writes one output dir shard by shard, into a hidden temp dir renamed on `close` (a reader
    never sees half an output). Shards are planned up front from the tensors' sizes, in the
    order they will arrive, so each file is named `-of-n` from the start."""

    def __init__(self, out: Output, plan: list[tuple[str, torch.dtype, int]], shard_bytes: int):
        self.out, self.dtypes = out, {name: dt for name, dt, _ in plan}
        if out.path.exists():
            raise FileExistsError(f"output dir {out.path} exists; each merge output needs a "
                                  "fresh dir (the scratch swaps by path)")
        self.tmp = out.path.with_name(f".{out.path.name}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        shards: list[list[str]] = [[]]
        size = 0
        for name, _, nbytes in plan:
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                   for i in range(n)]
        self.shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self.left = [len(names) for names in shards]
        self.pending: list[dict[str, torch.Tensor]] = [{} for _ in shards]
        self.total = sum(nbytes for _, _, nbytes in plan)

    def add(self, name: str, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        i = self.shard_of[name]
        self.pending[i][name] = t.to(self.dtypes[name]).contiguous()
        self.left[i] -= 1
        if self.left[i] == 0:
            save_file(self.pending[i], str(self.tmp / self.files[i]), metadata={"format": "pt"})
            self.pending[i] = {}

    def close(self) -> str:
        if any(self.left):
            raise RuntimeError(f"merge into {self.out.path} ended with "
                               f"{sum(self.left)} tensor(s) unwritten")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: self.files[i] for k, i in self.shard_of.items()}}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if self.out.template is not None:
            for f in Path(self.out.template).iterdir():
                if f.is_file() and not _SKIP_FILES.match(f.name):
                    shutil.copy2(f, self.tmp / f.name)
        self.tmp.rename(self.out.path)
        return str(self.out.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def stream_merge(inputs: Sequence[WeightsDir], fn: TensorFn, outputs: Sequence[Output],
                 shard_bytes: int | None = None) -> list[str]:
    """Merge the model dirs `inputs` tensor by tensor into the dirs `outputs`: for every tensor
    name (in the first input's order), `fn(name, [that tensor of each input, float32])` returns
    one tensor per output, cast to the output's dtype and written in shards of at most
    `shard_bytes` (default `SHARD_BYTES`). An input dir listed twice is read once per tensor.
    Tensors that are not floating point are copied from the first input to every output. The
    inputs must share tensor names and shapes (checked from their headers before anything is
    written). Returns the output dirs."""
    if not inputs or not outputs:
        raise ValueError(f"a merge needs inputs and outputs: {len(inputs)} input(s), "
                         f"{len(outputs)} output(s)")
    check_same_architecture({str(d.path): d.shapes for d in inputs})
    shard_bytes = shard_bytes or SHARD_BYTES
    ref = inputs[0]
    unique: dict[Path, int] = {}
    for d in inputs:
        unique.setdefault(d.path.resolve(), len(unique))
    readers = [next(d for d in inputs if d.path.resolve() == p) for p in unique]
    slots = [unique[d.path.resolve()] for d in inputs]

    def dtype(out: Output, name: str, info: TensorInfo) -> torch.dtype:
        if not info.dtype.is_floating_point:
            return info.dtype
        return (out.dtypes or {}).get(name, torch.float32)

    writers: list[_ShardWriter] = []
    try:
        for out in outputs:
            plan = [(k, dt := dtype(out, k, i), math.prod(i.shape) * dt.itemsize)
                    for k, i in ref.tensors.items()]
            writers.append(_ShardWriter(out, plan, shard_bytes))
        for name, info in ref.tensors.items():
            if not info.dtype.is_floating_point:
                t = ref.read(name)
                for w in writers:
                    w.add(name, t)
                continue
            read = [r.read(name).float() for r in readers]
            res = fn(name, [read[s] for s in slots])
            del read
            res = (res,) if isinstance(res, torch.Tensor) else tuple(res)
            if len(res) != len(writers):
                raise ValueError(f"merge function gave {len(res)} tensor(s) for {name!r}, "
                                 f"the merge has {len(writers)} output(s)")
            for w, t in zip(writers, res):
                if tuple(t.shape) != info.shape:
                    raise ValueError(f"merge function gave shape {list(t.shape)} for "
                                     f"{name!r}, the inputs' is {list(info.shape)}")
                w.add(name, t)
            del res
        return [w.close() for w in writers]
    except BaseException:
        for w in writers:
            w.abort()
        raise


def linear_fn(weights: Sequence[float]) -> TensorFn:
    """The merge function of sum_i w_i * input_i (one output)."""
    weights = list(weights)
    return lambda name, ts: combine(ts, weights)


# --- reading members ---------------------------------------------------------------------------

def local_dir(path: str) -> Path:
    """A model dir on this node for a weights path (a local dir, or a hub name in the cache)."""
    return models.local_model_dir(path)


@dataclass
class Members:
    """The job's models as weight dirs (headers read, no tensors), plus an optional base.
    `template` is the dir whose config and tokenizer candidates copy, `dtypes` the dtype each
    candidate tensor is saved in (the template's)."""

    names: list[str]
    dirs: dict[str, str]
    weights: dict[str, WeightsDir]
    template: str
    base_name: str | None = None
    base: WeightsDir | None = None

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return self.weights[self.names[0]].dtypes

    def ordered(self, names: Sequence[str] | None = None) -> list[WeightsDir]:
        return [self.weights[n] for n in (names or self.names)]


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
    """The job's members' current weight dirs (and `base`, if given), their headers read and
    checked to share one architecture. No tensor data is read."""
    ctx.require_scratch(who)  # before reading any weights: fail fast without one
    if len(ctx.models) < min_models:
        raise ValueError(f"{who} needs at least {min_models} models, the job has {ctx.models}")
    dirs = {m: str(local_dir(await ctx.pool.weights_path(m))) for m in ctx.models}
    base_dir = await resolve_weights(ctx, base) if base is not None else None

    def read():
        weights = {m: WeightsDir(d) for m, d in dirs.items()}
        if base in weights:  # a job model as the base: the same dir
            b = weights[base]
        else:
            b = WeightsDir(base_dir) if base_dir is not None else None
        shapes = {m: w.shapes for m, w in weights.items()}
        if b is not None and base not in weights:
            shapes[f"base {base}"] = b.shapes
        check_same_architecture(shapes)
        return weights, b

    weights, b = await asyncio.to_thread(read)
    return Members(names=list(ctx.models), dirs=dirs, weights=weights,
                   template=dirs[ctx.models[0]], base_name=base, base=b)


# --- scoring candidates through the scratch ------------------------------------------------------

def scoring_params(params: SamplingFields, task: Task) -> SamplingParams:
    """The sampling of a dev pass that scores a candidate: greedy (temperature 0, no seed), as
    the reference decodes when it scores weight candidates, whatever the job's temperature."""
    return SamplingParams(max_tokens=params.max_tokens or task.max_tokens, temperature=0.0,
                          top_p=1.0, seed=None)


@dataclass
class Scored:
    label: str
    path: str
    score: float
    written: bool  # made by this job (deletable), not a member's own dir


@dataclass
class Candidates:
    """Writes candidates under the job's workdir (`merge`) and scores each on dev through the
    scratch (cached by dir: a dir is scored once). `history` lists every scored candidate in
    order."""

    ctx: StrategyContext
    dev: DevSplit
    params: WeightFields
    strategy: str
    members: Members | None = None
    history: list[Scored] = field(default_factory=list)
    _scores: dict[str, float] = field(default_factory=dict)
    _root: Path | None = None
    _written: int = 0  # candidate dirs handed out so far (numbers them)

    def __post_init__(self):
        self.ctx.require_scratch(self.strategy)

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(self.ctx.workdir) / self.strategy
            self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def output(self, label: str) -> Output:
        """A fresh candidate dir: the members' dtypes and their config and tokenizer."""
        if self.members is None:
            raise RuntimeError("Candidates needs the members (template and dtypes) to write")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80]
        path = self.root / f"{self._written:04d}-{safe}"
        self._written += 1
        return Output(path, self.members.dtypes, Path(self.members.template))

    async def merge(self, inputs: Sequence[WeightsDir], fn: TensorFn, label: str) -> str:
        """Stream `fn` over `inputs` into a new candidate dir; its path."""
        [path] = await asyncio.to_thread(stream_merge, inputs, fn, [self.output(label)])
        return path

    async def score_dir(self, path: str, label: str, written: bool = False) -> float:
        """Mean dev score of the weights at `path`, generated greedily by the scratch."""
        if path in self._scores:
            return self._scores[path]
        sp = scoring_params(self.params, self.ctx.task)

        async def one(ectx: ExampleContext, ex: Example) -> float:
            prompt = self.ctx.task.prompt(ex)
            [g] = await ectx.generate_with(path, prompt, sp, step=f"dev:{label}")
            return await asyncio.to_thread(self.ctx.task.score, g.text, ex)

        scores = await over_dev(self.ctx, self.dev, self.params.dev_size, one)
        score = sum(scores) / len(scores)
        self._scores[path] = score
        self.history.append(Scored(label, path, score, written))
        return score

    async def score_merge(self, inputs: Sequence[WeightsDir], fn: TensorFn,
                          label: str) -> tuple[str, float]:
        """Merge a candidate (`merge`) and score it; (dir, score)."""
        path = await self.merge(inputs, fn, label)
        return path, await self.score_dir(path, label, written=True)

    def prune(self, keep: set[str] | Sequence[str]) -> None:
        """Delete the scored candidate dirs this job wrote, except `keep` (no-op with
        keep_candidates)."""
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
    """The chosen weights' answer to the example, generated by the scratch with the job's
    sampling settings."""
    prompt = ectx.task.prompt(ectx.example)
    [g] = await ectx.generate_with(weights, prompt, params.sampling(ectx.task, ectx.rng),
                                   step="answer")
    return g.text
