"""`moco-ray plan CONFIG --cluster 2x8x80GB`: where a run or evolve config's deployment replicas,
logit groups and trainers would go on a GPU cluster, each GPU's memory budget, and whether it
all fits, before anything starts. Arithmetic only: no Ray, no weights, no downloads.

Placement: first-fit decreasing. Every replica, group replica and trainer is a list of GPU
bundles (a share of one GPU and the bytes it takes there), built by `moco_ray.pool.placement` as
the pool deploys them. Phase by phase (the pool, then the trainers that start beside it, then
the replicas autoscaling may add), the largest item first (GPUs, then bytes, then config order),
each goes to the first node (in order) whose GPUs take all its bundles, first GPU with room
first; a tensor-parallel replica (STRICT_PACK) or a group replica (one actor) must get one node,
a pipeline-parallel one (PACK) spreads over nodes only when no single node has room.

Memory per GPU of each item:
  vLLM replica     gpu_memory_utilization x GPU memory, the engine's whole budget: its weights
                   (parameters x dtype bytes / (tensor x pipeline size)) and the rest, the KV cache
                   share (an upper bound: vLLM also takes activations from it). vLLM refuses to
                   start when that share holds no max_model_len sequence (KV bytes per token:
                   `moco_ray.models.sizing`), and so does this plan.
  hf engine replica, weights x HF_MEMORY_FACTOR (1.2: KV cache and activations).
  logit group member
  trainer worker   weights + LoRA + optimizer states + activations, with P parameters,
                   T trainable (P for full fine-tuning; LoRA: rank x (in + out) summed over its
                   target layers), W workers, b = 2 bytes with bf16 else 4:
                     weights      P·b           (÷ W under ZeRO-3)
                     LoRA         T·b           (LoRA only)
                     states       T·(b + 8 + 4 if bf16 else b + 8)  (÷ W under ZeRO-2/3):
                                  gradients, Adam's two fp32 moments, the fp32 master copy
                     activations  batch_size·max_seq_len·(34·h·L·b/2 + 4·V): 34·s·b·h bytes per
                                  layer in 16 bit without recomputation (Korthikanti et al.
                                  2022, attention scores not kept by SDPA) plus fp32 logits.
                   Without a config.json (params_b only) LoRA and activations are unknown: the
                   figure is a lower bound and the plan says so.
Parameter counts come from the model's config.json when it is on this machine (zoo models once
built, local dirs, the hub cache; formula in `moco_ray.models.sizing`), else from `params_b`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from moco_ray.config import (
    DistillConfig,
    EvolveConfig,
    LogitGroupSpec,
    ModelSpec,
    RunConfig,
    read_yaml,
)
from moco_ray.config.distill import DEFAULT_ADAPTER, on_gpu_pool
from moco_ray.models import sizing
from moco_ray.pool import placement
from moco_ray.pool.placement import HF_MEMORY_FACTOR
from moco_ray.workflows.load import parse_config, parse_evolve

GIB = 1 << 30
_EPS = 1e-9


@dataclass(frozen=True)
class Cluster:
    """Identical nodes: `nodes` x `gpus` GPUs of `gpu_bytes` each ('2x8x80GB'; '2x0': CPU only).
    GB here is GiB (2^30 bytes), as GPU makers' "80GB" means."""

    nodes: int
    gpus: int
    gpu_bytes: int

    @classmethod
    def parse(cls, spec: str) -> Cluster:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+(?:\.\d+)?)\s*(?:gib|gb|g))?\s*",
                         spec, re.IGNORECASE)
        if not m or int(m[1]) < 1 or (int(m[2]) > 0 and m[3] is None):
            raise ValueError(f"cluster {spec!r} is not NODESxGPUSxMEMORY, e.g. 2x8x80GB (two "
                             "nodes of eight 80 GB GPUs), 1x1x40GB, or 2x0 for CPU-only nodes")
        return cls(int(m[1]), int(m[2]), int(float(m[3] or 0) * GIB))

    def __str__(self) -> str:
        mem = f"x{self.gpu_bytes / GIB:g}GB" if self.gpus else ""
        return f"{self.nodes}x{self.gpus}{mem}"


@dataclass(frozen=True)
class Size:
    """A model's size: parameters, bytes per parameter, its config.json if on this machine."""

    params: int
    bytes_per_param: int
    config: dict | None

    @property
    def weights(self) -> int:
        return self.params * self.bytes_per_param


@dataclass
class Item:
    """One thing to place: GPU bundles (share of one GPU, bytes on it), all on one node
    (`strict`) or, failing that, over several (PACK)."""

    kind: str  # replica | group | trainer | autoscale
    name: str
    index: int
    bundles: list[tuple[float, int]]
    strict: bool = True
    weights: list[int] = field(default_factory=list)  # per bundle
    kv: list[int | None] = field(default_factory=list)
    note: str = ""
    where: list[tuple[int, int]] = field(default_factory=list)  # (node, gpu) per bundle, once placed


@dataclass
class Plan:
    cluster: Cluster
    items: list[Item]
    used: list[list[int]]  # [node][gpu] bytes
    holders: list[list[list[str]]]
    problems: list[str]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems


# --- sizes ---------------------------------------------------------------------------------------

def model_size(m: ModelSpec, dtype: str) -> Size:
    """`m`'s size in `dtype`; ValueError naming the model and the fix when unknown."""
    cfg = sizing.local_config(m.path)
    params = sizing.param_count(cfg) if cfg else None
    if params is None and m.params_b is not None:
        params = int(m.params_b * 1e9)
    if params is None:
        why = (f"its config.json (model_type {cfg.get('model_type')!r}) is not a shape the "
               "parameter formula covers" if cfg else "its config.json is not on this machine "
               "(a hub model not in the hub cache, or a zoo model not built yet)")
        raise ValueError(f"pool model {m.name!r} ({m.path}): size unknown, {why}; fix: set "
                         "params_b (billions of parameters) on the model")
    return Size(params, sizing.dtype_bytes(dtype, cfg), cfg)


def trainer_bytes(size: Size, cfg: DistillConfig) -> tuple[int, bool]:
    """Bytes one trainer worker takes on its GPU (module docstring's formula), and whether it
    is exact to the formula (False: a lower bound, the config's shape being unknown)."""
    b = 2 if cfg.bf16 else 4
    p, w = size.params, cfg.num_workers
    shape = sizing.shape(size.config) if size.config else None
    if cfg.method == "full":
        t: int | None = p
    else:
        t = sizing.lora_params(size.config, cfg.lora_r, cfg.lora_target_modules) \
            if size.config else None
    total = p * b / (w if cfg.zero_stage == 3 else 1)
    if cfg.method == "lora":
        total += (t or 0) * b
    total += (t or 0) * (b + 8 + (4 if cfg.bf16 else 0)) / (w if cfg.zero_stage >= 2 else 1)
    if shape:
        total += cfg.batch_size * cfg.max_seq_len * (34 * shape["h"] * shape["L"] * b / 2
                                                     + 4 * shape["V"])
    return int(total), shape is not None and t is not None


# --- items ---------------------------------------------------------------------------------------

def _replica_items(m: ModelSpec, size: Size, cluster: Cluster,
                   problems: list[str]) -> list[Item]:
    gpus = m.gpus_per_replica
    if gpus == 0:
        return [Item("replica" if r < m.start_replicas else "autoscale", m.name, r, [],
                     note=f"cpu ({m.num_cpus:g} CPU)") for r in range(m.max_replicas)]
    workers = m.workers
    bundles = placement.replica_bundles(m)
    frac = 1.0 if bundles else m.num_gpus
    if m.engine == "vllm":
        reserve = int(m.gpu_memory_utilization * cluster.gpu_bytes)
        weights = size.weights // workers
        kv = reserve - weights
        note = f"vLLM, utilization {m.gpu_memory_utilization:g}"
        per_token = sizing.kv_bytes_per_token(size.config, size.bytes_per_param) \
            if size.config else None
        if not per_token:
            note += "; KV per token unknown (no config.json)"
        elif kv > 0:
            seq = per_token * m.max_model_len // workers
            fit = kv // seq
            note += f"; KV holds {fit} x {m.max_model_len} tokens"
            if fit < 1 and cluster.gpus:
                problems.append(
                    f"model {m.name!r}: its KV cache share ({kv / GIB:.2f} GiB per GPU) holds "
                    f"no max_model_len={m.max_model_len} sequence ({seq / GIB:.2f} GiB); vLLM "
                    "refuses to start; fix: lower max_model_len, raise gpu_memory_utilization "
                    "or tensor_parallel_size")
        if cluster.gpus and kv <= 0:
            problems.append(
                f"model {m.name!r}: its weights ({weights / GIB:.1f} GiB per GPU) fill its vLLM "
                f"budget (gpu_memory_utilization {m.gpu_memory_utilization:g} x "
                f"{cluster.gpu_bytes / GIB:g} GiB = {reserve / GIB:.1f} GiB), no room for a KV "
                "cache; fix: raise gpu_memory_utilization or tensor_parallel_size, or larger GPUs")
        kv_at: int | None = kv
    else:
        reserve = int(size.weights * HF_MEMORY_FACTOR)
        weights, kv_at = size.weights, None
        note = f"{m.engine}, weights x {HF_MEMORY_FACTOR:g}"
    n = max(workers, 1)
    items = []
    for r in range(m.max_replicas):
        it = Item("replica" if r < m.start_replicas else "autoscale", m.name, r,
                  [(frac, reserve)] * n, strict=m.pipeline_parallel_size == 1,
                  weights=[weights] * n, kv=[kv_at] * n, note=note)
        items.append(it)
    return items


def _group_items(g: LogitGroupSpec, sizes: dict[str, Size], cluster: Cluster) -> list[Item]:
    need = [int(sizes[m].weights * HF_MEMORY_FACTOR) for m in g.models]
    if g.num_gpus == 0:
        return [Item("group", g.name, r, [], note=f"cpu ({g.num_cpus:g} CPU), members "
                     f"{', '.join(g.models)}") for r in range(g.replicas)]
    n_gpus = max(1, int(g.num_gpus))
    devices = placement.member_devices(need, [cluster.gpu_bytes] * n_gpus)
    per_gpu = [0] * n_gpus
    weights = [0] * n_gpus
    for i, dev in enumerate(devices):
        if dev.startswith("cuda:"):
            j = int(dev.split(":")[1])
            per_gpu[j] += need[i]
            weights[j] += sizes[g.models[i]].weights
    for i, dev in enumerate(devices):  # device_map='auto': fills the GPUs in order
        if dev == "auto":
            left = need[i]
            for j in range(n_gpus):
                take = left if j == n_gpus - 1 else min(left, max(0, cluster.gpu_bytes
                                                                  - per_gpu[j]))
                per_gpu[j] += take
                weights[j] += int(take / HF_MEMORY_FACTOR)
                left -= take
    frac = g.num_gpus if g.num_gpus < 1 else 1.0
    where = " ".join(f"{m}:{d.removeprefix('cuda:')}" for m, d in zip(g.models, devices))
    return [Item("group", g.name, r, [(frac, b) for b in per_gpu], weights=list(weights),
                 kv=[None] * n_gpus, note=f"member:GPU {where}; weights x {HF_MEMORY_FACTOR:g}")
            for r in range(g.replicas)]


def _trainer_item(name: str, size: Size, cfg: DistillConfig) -> Item:
    per, exact = trainer_bytes(size, cfg)
    how = (f"{cfg.method}, zero {cfg.zero_stage}, {'bf16' if cfg.bf16 else 'fp32'}, "
           f"batch {cfg.batch_size} x {cfg.max_seq_len}")
    if not exact:
        how += "; lower bound (no config.json)"
    if not cfg.use_gpu:
        return Item("trainer", name, 0, [], note=f"cpu ({cfg.num_workers} workers), {how}")
    return Item("trainer", name, 0, [(1.0, per)] * cfg.num_workers, strict=False,
                weights=[int(size.weights / (cfg.num_workers if cfg.zero_stage == 3 else 1))]
                * cfg.num_workers, kv=[None] * cfg.num_workers, note=how)


# --- placement -----------------------------------------------------------------------------------

def _fit(frac: list[float], free: list[int], bundles) -> list[int] | None:
    frac, free, ids = list(frac), list(free), []
    for f, b in bundles:
        for j in range(len(frac)):
            if frac[j] + _EPS >= f and free[j] >= b:
                frac[j] -= f
                free[j] -= b
                ids.append(j)
                break
        else:
            return None
    return ids


def _place(it: Item, frac: list[list[float]], free: list[list[int]]) -> bool:
    where: list[tuple[int, int]] | None = None
    for node in range(len(frac)):
        ids = _fit(frac[node], free[node], it.bundles)
        if ids is not None:
            where = [(node, j) for j in ids]
            break
    if where is None and not it.strict:  # PACK: one node if possible, else across nodes
        f2, b2 = [list(x) for x in frac], [list(x) for x in free]
        where = []
        for bundle in it.bundles:
            for node in range(len(f2)):
                ids = _fit(f2[node], b2[node], [bundle])
                if ids is not None:
                    f2[node][ids[0]] -= bundle[0]
                    b2[node][ids[0]] -= bundle[1]
                    where.append((node, ids[0]))
                    break
            else:
                return False
    if where is None:
        return False
    for (node, j), (f, b) in zip(where, it.bundles):
        frac[node][j] -= f
        free[node][j] -= b
    it.where = where
    return True


def _need(it: Item) -> str:
    gib = max(b for _, b in it.bundles) / GIB
    share = it.bundles[0][0]
    if len(it.bundles) > 1:
        return (f"{len(it.bundles)} whole GPUs{' on one node' if it.strict else ''} with "
                f"{gib:.1f} GiB each")
    return (f"a whole GPU with {gib:.1f} GiB" if share >= 1
            else f"{share:g} of a GPU and {gib:.1f} GiB on it")


def place(items: list[Item], cluster: Cluster) -> tuple[list[list[int]], list[list[list[str]]],
                                                        list[str], list[str]]:
    """Place `items` (in place: each gets `where`); returns per-GPU bytes used, holders,
    problems (a pool or trainer item that does not fit) and notes (autoscale ones)."""
    frac = [[1.0] * cluster.gpus for _ in range(cluster.nodes)]
    free = [[cluster.gpu_bytes] * cluster.gpus for _ in range(cluster.nodes)]
    problems, notes = [], []
    phases = (("replica", "group"), ("trainer",), ("autoscale",))
    order = {id(it): k for k, it in enumerate(items)}
    for kinds in phases:
        todo = [it for it in items if it.kind in kinds and it.bundles]
        todo.sort(key=lambda it: (-sum(f for f, _ in it.bundles),
                                  -sum(b for _, b in it.bundles), order[id(it)]))
        for it in todo:
            if _place(it, frac, free):
                continue
            what = f"{it.kind} {it.name!r}" + (f" #{it.index}" if it.kind != "trainer" else "")
            if it.kind == "autoscale":
                notes.append(f"{what}: autoscaling could not add it (no room for {_need(it)})")
            elif not cluster.gpus:
                problems.append(f"{what} needs GPUs; cluster {cluster} has none")
            elif max(b for _, b in it.bundles) > cluster.gpu_bytes:
                problems.append(f"{what} does not fit: it needs {_need(it)} ({it.note}), "
                                f"more than one GPU of {cluster} holds; fix: more GPUs for it "
                                "(num_gpus, tensor_parallel_size), larger GPUs, or a smaller "
                                "dtype / gpu_memory_utilization")
            else:
                problems.append(f"{what} does not fit: it needs {_need(it)} ({it.note}), and "
                                f"no node of {cluster} has that left after what went before "
                                "it (the pool, then trainers, largest first); fix: more GPUs or nodes, or fewer or smaller "
                                "replicas, groups or trainers")
    used = [[cluster.gpu_bytes - b for b in node] for node in free]
    holders: list[list[list[str]]] = [[[] for _ in range(cluster.gpus)]
                                      for _ in range(cluster.nodes)]
    for it in items:
        for node, j in it.where:
            label = it.name if it.kind == "trainer" else f"{it.name}#{it.index}"
            if label not in holders[node][j]:
                holders[node][j].append(label)
    return used, holders, problems, notes


# --- configs ---------------------------------------------------------------------------------------

def plan_config(cfg: RunConfig | EvolveConfig, cluster: Cluster) -> Plan:
    """Where `cfg` would run on `cluster`; `Plan.problems` says what does not fit."""
    pool = cfg.pool
    problems: list[str] = []
    notes: list[str] = []
    sizes: dict[str, Size] = {}
    items: list[Item] = []
    for m in pool.models:
        try:
            sizes[m.name] = model_size(m, m.dtype)
        except ValueError as e:
            problems.append(str(e))
            continue
        items += _replica_items(m, sizes[m.name], cluster, problems)
    for g in pool.logit_groups:
        if not all(n in sizes for n in g.models):
            continue  # a member's size is unknown: already a problem
        try:
            group_sizes = {n: model_size(pool.model(n), g.dtype) for n in g.models}
        except ValueError as e:
            problems.append(f"logit group {g.name!r}: {e}")
            continue
        items += _group_items(g, group_sizes, cluster)
    members = [m for m in pool.members if m.name in sizes]
    if isinstance(cfg, EvolveConfig):
        for m in members:  # distill_all trains every member at once, beside the live pool
            items.append(_trainer_item(f"distill:{m.name}", sizes[m.name], cfg.distill))
    elif cfg.max_trainings and members:
        adapter = on_gpu_pool(DEFAULT_ADAPTER) if pool.on_gpus else DEFAULT_ADAPTER
        big = max(members, key=lambda m: sizes[m.name].weights)
        for k in range(cfg.max_trainings):
            it = _trainer_item(f"adapters:{k}", sizes[big.name], adapter)
            it.note += f"; sized for the largest member, {big.name!r}"
            items.append(it)
    elif members:
        notes.append("in-job adapter trainings (strategies that learn) are not planned: "
                     "max_trainings is unset, so as many run as jobs ask for; set max_trainings "
                     "to reserve room for them")
    used, holders, fit_problems, fit_notes = place(items, cluster)
    return Plan(cluster, items, used, holders, problems + fit_problems, notes + fit_notes)


def load_any(path: str | Path) -> RunConfig | EvolveConfig:
    """A run config, or an evolve config (it has `system` rather than `jobs`), validated."""
    raw = read_yaml(path)
    return parse_evolve(raw, str(path)) if "system" in raw else parse_config(raw, str(path))


def plan_file(path: str | Path, cluster: str) -> Plan:
    """`plan_config` of a config file on a cluster spec; ConfigError / ValueError when either
    is bad."""
    spec = Cluster.parse(cluster)
    return plan_config(load_any(path), spec)


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.1f}"


def tables(plan: Plan) -> list[Table]:
    """The plan as rich tables: where each item goes, then each GPU's memory."""
    where = Table(title=f"placement on {plan.cluster}")
    for col in ("what", "name", "#", "node", "GPUs", "GiB/GPU", "weights/GPU", "KV/GPU", "note"):
        where.add_column(col, justify="right" if "/" in col or col == "#" else "left")
    for it in plan.items:
        if it.where:
            nodes = sorted({n for n, _ in it.where})
            gpus = " ".join(f"{n}:{j}" for n, j in it.where)
            node = ",".join(str(n) for n in nodes)
        elif it.bundles:
            node, gpus = "-", "NOT PLACED"
        else:
            node, gpus = "-", "cpu"
        per = max((b for _, b in it.bundles), default=None)
        where.add_row(it.kind, it.name, str(it.index), node, gpus, _gib(per),
                      _gib(max(it.weights, default=None)),
                      _gib(max((k for k in it.kv if k is not None), default=None)), it.note)
    memory = Table(title="GPU memory (GiB)")
    for col in ("node", "GPU", "used", "free", "holders"):
        memory.add_column(col, justify="left" if col == "holders" else "right")
    for n, node in enumerate(plan.used):
        for j, used in enumerate(node):
            memory.add_row(str(n), str(j), _gib(used), _gib(plan.cluster.gpu_bytes - used),
                           ", ".join(plan.holders[n][j]) or "-")
    return [where, memory] if plan.cluster.gpus else [where]
