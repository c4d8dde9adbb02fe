"""The Strategy interface, the per-example context strategies run in, and `register`.

A strategy is one collaboration method. It sees the pool only through `ExampleContext`, which
records every call as a `Turn` of the trace and counts its cost per model, so traces and cost
accounting never depend on each strategy remembering to do it.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from moco_ray.records import Cost, Generation, Prompt, Record, SamplingParams, Score, Turn
from moco_ray.tasks.base import DevSplit, Example, Task, TestSplit, require_dev

Level = Literal["single", "api", "text", "logit", "weight"]


class PoolClient(Protocol):
    """What strategies may ask of the pool (implemented over Serve handles in pool/client.py)."""

    models: list[str]

    async def generate(self, model: str, prompts: list[Prompt], params: SamplingParams,
                       lora: str | None = None) -> list[Generation]: ...

    async def score(self, model: str, prompt: Prompt, continuations: list[str],
                    lora: str | None = None) -> list[Score]: ...

    async def generate_with(self, scratch: str, weights: str, prompts: list[Prompt],
                            params: SamplingParams) -> list[Generation]: ...

    async def weights_path(self, model: str) -> str: ...

    async def fused_generate(self, group: str, prompts: list[Prompt], params: SamplingParams,
                             mode: str, weights: list[float]) -> list[Generation]: ...

    def render(self, model: str, prompt: Prompt) -> str: ...


class Trainer(Protocol):
    """What strategies that learn may ask of the trainer (implemented by
    `moco_ray.training.service.TrainerService`; reached as `ctx.trainer`). Each call trains
    LoRA adapters over pool models from the weights they serve now, charges the time to the
    job's cost, and returns adapter dirs the pool serves per request."""

    async def train_adapters(self, ctx: StrategyContext, jobs: dict[str, tuple[str, list[dict]]],
                             cfg: Any = None) -> dict[str, str]: ...

    async def train_dpo(self, ctx: StrategyContext,
                        jobs: dict[str, tuple[str, list[dict], str | None]], cfg: Any,
                        beta: float) -> dict[str, str]: ...

    async def train_grpo(self, ctx: StrategyContext, name: str, model: str, rows: list[dict],
                         reward: Any, cfg: Any, settings: Any) -> str: ...


class StrategyContext:
    """Job-wide state handed to `fit` and `solve`: pool, trainer, task, models, seeded RNG."""

    def __init__(self, pool: PoolClient, task: Task, models: list[str], seed: int = 0,
                 logit_group: str | None = None, scratch: str | None = None,
                 job_id: str = "job", workdir: str | None = None,
                 trainer: Trainer | None = None):
        self.pool = pool
        self._trainer = trainer
        self.task = task
        self.models = list(models)
        self.seed = seed
        self.rng = random.Random(seed)
        self.logit_group = logit_group
        self.scratch = scratch  # scratch deployment for weight candidates (weight level)
        self.job_id = job_id
        # Where a job keeps what it makes (trained adapters, merged candidates): a dir every
        # node of the cluster can read, since replicas load from it. Made on first use.
        self._workdir = workdir
        # Cost of the whole job (fit and solve), per model; every ExampleContext adds to it.
        self.cost: dict[str, Cost] = {}

    def example(self, example: Example) -> ExampleContext:
        return ExampleContext(self, example)

    @property
    def workdir(self) -> str:
        if self._workdir is None:
            import os
            import tempfile

            # <storage>/<run_name>/scratch under `moco-ray run` / `evolve`, else system temp
            root = os.environ.get("MOCO_RAY_WORKDIR") or None
            if root:
                os.makedirs(root, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.job_id)
            self._workdir = tempfile.mkdtemp(prefix=f"moco_{safe}_", dir=root)
        return self._workdir

    @property
    def trainer(self) -> Trainer:
        if self._trainer is None:
            raise ValueError("this job's context has no trainer, and its strategy trains; the "
                             "coordinator gives every job one (a context made by hand needs "
                             "trainer=moco_ray.training.service.TrainerService())")
        return self._trainer

    def require_scratch(self, who: str) -> str:
        if self.scratch is None:
            raise ValueError(f"{who} scores merged weights in a scratch deployment, and the "
                             "pool has none; add a model with role: scratch to pool.models")
        return self.scratch


class ExampleContext:
    """Per-example view of the pool: each call becomes a Turn and adds to the cost."""

    def __init__(self, job: StrategyContext, example: Example):
        self.job = job
        self.example = example
        self.task = job.task
        self.models = job.models
        self.rng = random.Random(f"{job.seed}:{example.id}")
        self.trace: list[Turn] = []
        self.cost: dict[str, Cost] = {}
        self.versions: dict[str, int] = {}

    def _add_cost(self, model: str, c: Cost) -> None:
        self.cost[model] = self.cost.get(model, Cost()).add(c)
        self.job.cost[model] = self.job.cost.get(model, Cost()).add(c)

    def _account(self, model: str, gens: list[Generation], seconds: float) -> None:
        c = Cost(calls=1, prompt_tokens=sum(g.prompt_tokens for g in gens),
                 completion_tokens=sum(g.completion_tokens for g in gens),
                 engine_seconds=sum(g.engine_seconds for g in gens) or seconds)
        self._add_cost(model, c)
        for g in gens:
            self.versions[g.model or model] = g.version

    async def generate(self, model: str, prompt: Prompt, params: SamplingParams,
                       step: str = "generate", n: int = 1) -> list[Generation]:
        """`n` samples of one prompt from one model; each becomes a Turn of the trace."""
        t0 = time.perf_counter()
        gens = await self.job.pool.generate(model, [prompt] * n, params)
        self._account(model, gens, time.perf_counter() - t0)
        text = _prompt_text(prompt)
        for g in gens:
            self.trace.append(Turn(model=model, step=step, prompt=text, output=g.text,
                                   version=g.version,
                                   meta={"mean_logprob": g.mean_logprob,
                                         "finish_reason": g.finish_reason}))
        return gens

    async def score(self, model: str, prompt: Prompt, continuations: list[str],
                    step: str = "score", lora: str | None = None) -> list[Score]:
        t0 = time.perf_counter()
        scores = await self.job.pool.score(model, prompt, continuations, lora=lora)
        n_tok = sum(s.num_tokens for s in scores)
        self._add_cost(model, Cost(calls=1, prompt_tokens=n_tok,
                                   engine_seconds=time.perf_counter() - t0))
        meta: dict[str, Any] = {"continuations": continuations}
        if lora is not None:
            meta["lora"] = lora
        self.trace.append(Turn(model=model, step=step, prompt=_prompt_text(prompt),
                               output=repr([round(s.mean_logprob, 4) for s in scores]),
                               meta=meta))
        return scores

    async def generate_lora(self, model: str, lora: str, prompt: Prompt, params: SamplingParams,
                            step: str = "generate", n: int = 1) -> list[Generation]:
        """`n` samples from `model` with the LoRA adapter dir `lora` (a job's trained adapter;
        the model needs enable_lora and the vllm engine)."""
        t0 = time.perf_counter()
        gens = await self.job.pool.generate(model, [prompt] * n, params, lora)
        self._account(model, gens, time.perf_counter() - t0)
        for g in gens:
            self.trace.append(Turn(model=model, step=step, prompt=_prompt_text(prompt),
                                   output=g.text, version=g.version,
                                   meta={"lora": lora, "mean_logprob": g.mean_logprob}))
        return gens

    async def generate_with(self, weights: str, prompt: Prompt, params: SamplingParams,
                            step: str = "candidate", n: int = 1) -> list[Generation]:
        """`n` samples from the job's scratch deployment serving the weights dir `weights`
        (a merged candidate); the scratch swaps them in first when it serves other weights."""
        scratch = self.job.require_scratch("this strategy")
        t0 = time.perf_counter()
        gens = await self.job.pool.generate_with(scratch, weights, [prompt] * n, params)
        self._account(scratch, gens, time.perf_counter() - t0)
        for g in gens:
            self.trace.append(Turn(model=scratch, step=step, prompt=_prompt_text(prompt),
                                   output=g.text, meta={"weights": weights,
                                                        "mean_logprob": g.mean_logprob}))
        return gens

    async def fused_generate(self, prompt: Prompt, params: SamplingParams, mode: str,
                             weights: list[float], step: str = "fused") -> Generation:
        group = self.job.logit_group
        if group is None:
            raise ValueError("this strategy needs a logit group in the pool config "
                             "(pool.logit_groups), none was given to the job")
        t0 = time.perf_counter()
        [gen] = await self.job.pool.fused_generate(group, [prompt], params, mode, weights)
        self._account(group, [gen], time.perf_counter() - t0)
        self.trace.append(Turn(model=group, step=step, prompt=_prompt_text(prompt),
                               output=gen.text, meta={"mode": mode, "weights": weights}))
        return gen


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class Answer(BaseModel):
    """What `solve` returns for one example: the final text and anything worth keeping."""

    output: str
    meta: dict[str, Any] = {}


class Strategy:
    """One collaboration method. Subclasses set `name`, `level`, a `Params` model, and `solve`.

    `fit` (optional) tunes on dev data only; `solve` answers one example through `ctx`.
    """

    name: ClassVar[str]
    level: ClassVar[Level]
    summary: ClassVar[str] = ""
    # Weight-level methods score candidates in the pool's scratch deployment (config checks it).
    needs_scratch: ClassVar[bool] = False

    class Params(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, params: BaseModel | dict | None = None):
        if isinstance(params, self.Params):
            self.params = params
        else:
            self.params = self.Params(**(params or {}))
        self.fitted: dict[str, Any] = {}

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        """Tune on dev. The default has nothing to tune."""

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        raise NotImplementedError

    async def fit_checked(self, ctx: StrategyContext, dev: DevSplit) -> None:
        await self.fit(ctx, require_dev(dev, f"{self.name}.fit"))

    async def run_example(self, ctx: StrategyContext, example: Example,
                          split: Literal["dev", "test"]) -> Record:
        ectx = ctx.example(example)
        ans = await self.solve(ectx, example)
        prompt = ctx.task.prompt(example)
        chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        # Metrics may execute code in the sandbox: keep the event loop free for other examples.
        score = await asyncio.to_thread(ctx.task.score, ans.output, example)
        return Record(strategy=self.name, task=ctx.task.name, split=split, example_id=example.id,
                      prompt=_prompt_text(prompt), chat=chat, output=ans.output,
                      reference=str(example.reference), score=score, trace=ectx.trace,
                      model_versions=ectx.versions, cost=ectx.cost, meta=ans.meta)

    async def run(self, ctx: StrategyContext, split: DevSplit | TestSplit,
                  concurrency: int = 16):
        """Yield records as examples finish (at most `concurrency` in flight)."""
        sem = asyncio.Semaphore(concurrency)

        async def one(ex: Example) -> Record:
            async with sem:
                return await self.run_example(ctx, ex, split.split)

        for fut in asyncio.as_completed([one(ex) for ex in split.examples]):
            yield await fut


# --- registration (lookup by name: registry.py) ----------------------------------------------

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str):
    """Class decorator: register a strategy under `name`; a duplicate name is an error."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco
