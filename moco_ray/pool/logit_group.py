"""`LogitGroupServer`: several pool models in ONE replica, decoded in lockstep.

Logit-level methods (fusion, contrastive decoding) need every model's next-token distribution at
every step; co-locating the models keeps that a local tensor operation with one KV cache per
model, instead of a cross-cluster RPC per token. The decoding itself is
`moco_ray.engines.lockstep.LockstepDecoder`; this module loads the models and serves it.
A member's hot-swap (`swap.py`) reaches the group too: its weights change in place here.
"""
from __future__ import annotations

import asyncio
import time

from ray import serve

from moco_ray.models import sizing
from moco_ray.models.tokenizer import render_prompt
from moco_ray.pool import placement
from moco_ray.pool.swap import hotswap as swap
from moco_ray.pool.swap.hotswap import WeightGate, WeightVersion
from moco_ray.records import Generation, Prompt, SamplingParams, TokenLogprobs

_DTYPES = ("float32", "bfloat16", "float16")


@serve.deployment(health_check_period_s=10, health_check_timeout_s=60)
class LogitGroupServer:
    """Serves `fused_generate` over the models of one LogitGroupSpec (name -> resolved path).

    The models must share one tokenizer; the first model's tokenizer renders and encodes.
    `swap_registry` names the pool's `swap.SwapRegistry`: members load their current version.
    """

    def __init__(self, name: str, paths: dict[str, str], dtype: str = "float32", seed: int = 0,
                 swap_registry: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # heavy (transformers): only the group's replica needs it, not the driver's pool
        from moco_ray.engines.lockstep import LockstepDecoder

        if dtype not in _DTYPES:
            raise ValueError(f"logit group {name!r}: dtype {dtype!r} is not one of {_DTYPES}")
        self.name = name
        self.members = list(paths)
        self.paths = dict(paths)
        # Each member's pool version and weights dir. `version` stamps the group's Generations:
        # the registry's number for this combination of member versions, so it names the same
        # weights across restarts (`ModelPool.group_versions` maps it back).
        self.versions = dict.fromkeys(self.members, 0)
        self.weights = dict(paths)
        self.version = 0
        self._registry = None
        if swap_registry is not None:  # started after a member's swap: load what it serves now
            import ray

            self._registry = reg = swap.registry(swap_registry)
            for m, v in zip(self.members, ray.get([reg.current.remote(m) for m in self.members])):
                self.versions[m], self.weights[m] = v.version, v.path
            self.version = ray.get(reg.group_version.remote(name, self.versions))
        # Seeds the sampling of requests without their own seed: a run is reproducible as a
        # whole while repeated calls still differ (as vLLM does with its engine seed).
        torch.manual_seed(seed)
        toks = {m: AutoTokenizer.from_pretrained(p) for m, p in paths.items()}
        first = self.members[0]
        self.tokenizer = toks[first]
        vocab = self.tokenizer.get_vocab()
        differ = [m for m in self.members[1:] if toks[m].get_vocab() != vocab]
        if differ:
            raise ValueError(f"logit group {name!r}: {differ} use a different tokenizer than "
                             f"{first!r}; a group needs models with one shared vocabulary")
        # One member per GPU where the replica holds enough (see placement.member_devices);
        # 'auto' members (too big for one GPU) load last, into what the others leave.
        paths_now = list(self.weights.values())
        devices = _member_devices(paths_now, dtype)
        loaded = {}
        for i in sorted(range(len(devices)), key=lambda i: devices[i] == "auto"):
            if devices[i] == "auto":
                loaded[i] = AutoModelForCausalLM.from_pretrained(
                    paths_now[i], dtype=getattr(torch, dtype), device_map="auto")
            else:
                loaded[i] = AutoModelForCausalLM.from_pretrained(
                    paths_now[i], dtype=getattr(torch, dtype)).to(devices[i])
        models = [loaded[i] for i in range(len(devices))]
        self.devices = dict(zip(self.members, devices))
        self._models = dict(zip(self.members, models))
        self._gate = WeightGate()
        self._swap_lock = asyncio.Lock()
        # Chat prompts are rendered by the template, which writes its own special tokens;
        # raw text gets them from the tokenizer (as vLLM and the HF engine do).
        # Log-probs of every member are gathered (and combined) on the first GPU, or the CPU.
        gather = "cuda:0" if devices[0] != "cpu" else "cpu"
        self._decoders = {raw: LockstepDecoder(models, self.tokenizer, add_special_tokens=raw,
                                               device=gather) for raw in (True, False)}
        # One decode at a time (the decoder keeps its KV caches on itself, and the models are
        # shared between both decoders), in a thread so health checks still answer; concurrent
        # requests with equal settings are batched into that one decode.
        self.batch_window_s = 0.005
        self.max_batch_requests = 64
        self.largest_batch = 0  # most calls decoded together so far (see info)
        self._pending: list[tuple] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None

    def render(self, prompt: Prompt) -> str:

        return render_prompt(self.tokenizer, prompt)  # the engines' own rendering

    def info(self) -> dict:
        return {"name": self.name, "models": self.members, "paths": self.paths,
                "version": self.version, "versions": dict(self.versions),
                "weights": dict(self.weights), "largest_batch": self.largest_batch,
                "devices": dict(self.devices)}

    async def apply_version(self, model: str, target: WeightVersion) -> int:
        """Load member `model`'s `target` weights in place (swap.py broadcasts this to the group
        as to the model's own replicas); returns the member's version served."""
        if model not in self._models:
            raise ValueError(f"logit group {self.name!r} has no member {model!r}; "
                             f"members: {self.members}")
        async with self._swap_lock:
            if target.version != self.versions[model]:
                after = {**self.versions, model: target.version}
                version = (self.version + 1 if self._registry is None else
                           await self._registry.group_version.remote(self.name, after))
                module = self._models[model]
                await swap.apply(self._gate,
                                 lambda t: asyncio.to_thread(_load_in_place, module, t.path),
                                 target, lambda t: self._commit(model, t, version))
        return self.versions[model]

    def _commit(self, model: str, target: WeightVersion, version: int) -> None:
        self.versions[model], self.weights[model] = target.version, target.path
        self.version = version

    async def fused_generate(self, prompts: list[Prompt], params: SamplingParams, mode: str,
                             weights: list[float] | None) -> list[Generation]:
        """One fused Generation per prompt; `mode` is the combine name ('fusion',
        'contrastive', ...), `weights` one per member model in the group's order."""
        if weights is not None and len(weights) != len(self.members):
            raise ValueError(f"logit group {self.name!r} has {len(self.members)} models "
                             f"{self.members}; got {len(weights)} weights, give one per model")
        out: list[Generation | None] = [None] * len(prompts)
        async with self._gate.request():  # no member's weights change during this call
            # Raw and chat prompts encode differently (special tokens), so decode them apart.
            for raw in (True, False):
                idx = [i for i, p in enumerate(prompts) if isinstance(p, str) == raw]
                if not idx:
                    continue
                texts = [self.render(prompts[i]) for i in idx]
                rows, seconds = await self._submit(raw, texts, params, mode, weights)
                for i, row in zip(idx, rows, strict=True):
                    out[i] = self._generation(row, params, seconds / len(rows))
        assert all(g is not None for g in out)
        return out

    # -- micro-batching: concurrent calls with the same settings decode as one batch ----------

    async def _submit(self, raw: bool, texts: list[str], params: SamplingParams, mode: str,
                      weights: list[float] | None) -> tuple[list[dict], float]:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        key = (raw, params.model_dump_json(), mode, tuple(weights) if weights else None)
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((key, texts, params, mode, weights, fut))
        self._wake.set()
        return await fut

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # A short window lets concurrent callers (many examples, many jobs) join the batch.
            await asyncio.sleep(self.batch_window_s)
            while self._pending:
                key, _, params, mode, weights, _ = self._pending[0]
                batch = [r for r in self._pending if r[0] == key][:self.max_batch_requests]
                self._pending = [r for r in self._pending if not any(r is b for b in batch)]
                texts = [t for r in batch for t in r[1]]
                self.largest_batch = max(self.largest_batch, len(batch))
                t0 = time.perf_counter()
                try:
                    rows = await asyncio.to_thread(
                        self._decoders[key[0]].generate, texts, params.max_tokens,
                        temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                        stop=params.stop, combine=mode, weights=weights,
                        top_logprobs=params.logprobs or 0)
                except Exception as e:  # noqa: BLE001 - handed to every caller of this batch
                    for r in batch:
                        if not r[5].done():
                            r[5].set_exception(e)
                    continue
                seconds = time.perf_counter() - t0
                start = 0
                for r in batch:
                    n = len(r[1])
                    if not r[5].done():
                        r[5].set_result((rows[start:start + n], seconds * n / len(rows)))
                    start += n

    def _generation(self, row: dict, params: SamplingParams, seconds: float) -> Generation:
        lps = None
        if params.logprobs is not None:
            lps = [TokenLogprobs(token_id=e["token_id"], logprob=e["logprob"],
                                 top=e.get("top", {})) for e in row["logprobs"]]
        return Generation(text=row["text"], token_ids=row["token_ids"],
                          finish_reason=row["finish_reason"], prompt_tokens=row["prompt_tokens"],
                          completion_tokens=row["completion_tokens"], logprobs=lps,
                          model=self.name, version=self.version, engine_seconds=seconds)


def _member_devices(paths: list[str], dtype: str) -> list[str]:
    """Each member's device on the GPUs this replica holds (all 'cpu' without one): what each
    needs is its weights (parameters from config.json, else its safetensors' size) times
    placement.HF_MEMORY_FACTOR, against each GPU's free memory now."""
    import torch

    if not torch.cuda.is_available():
        return ["cpu"] * len(paths)
    from pathlib import Path

    need = []
    for p in paths:
        cfg = sizing.local_config(p) or {}
        n = sizing.param_count(cfg)
        if n is not None:
            size = n * sizing.dtype_bytes(dtype)
        else:  # a shape the formula does not cover: the checkpoint's bytes, scaled to `dtype`
            size = (sum(f.stat().st_size for f in Path(p).glob("*.safetensors"))
                    * sizing.dtype_bytes(dtype) / sizing.dtype_bytes("auto", cfg))
        need.append(size * placement.HF_MEMORY_FACTOR)
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    return placement.member_devices(need, free)


def _load_in_place(module, path: str) -> None:
    """Copy a checkpoint's tensors into `module`'s own, in place (tied weights stay tied)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):  # read everything before touching
        tensors.update(load_file(str(f)))
    state = module.state_dict()
    problems = [f"unexpected tensor {k!r}" for k in sorted(set(tensors) - set(state))]
    problems += [f"tensor {k!r} has shape {list(t.shape)}, the model expects "
                 f"{list(state[k].shape)}" for k, t in sorted(tensors.items())
                 if k in state and t.shape != state[k].shape]
    if problems:  # checked before any copy: a misfit leaves the old weights whole
        raise ValueError(f"checkpoint {path!r} does not fit this group member: "
                         + "; ".join(problems[:10]))
    with torch.no_grad():
        for name, t in tensors.items():
            state[name].copy_(t)
