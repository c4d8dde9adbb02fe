"""`ModelServer`: one Serve deployment wrapping one Engine (vLLM or transformers).

Handles call `generate`, `score`, `render`, `info` and `load_weights`; HTTP clients reach the same
`generate` through the OpenAI routes of `openai_api.OpenAIRoutes` under `/<model>/v1/...`.
Every Generation leaving the server carries the model's name and the weight version that made it:
the pool's version (`swap.py` numbers them), which every replica of the model agrees on.
Resources, replicas and max_ongoing_requests are set per model by `ModelPool` with `.options()`.
"""
from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Protocol, runtime_checkable

from ray import serve

from moco_ray.config import EngineSpec
from moco_ray.engines.base import Engine
from moco_ray.engines.registry import build_engine
from moco_ray.pool.openai_api import OpenAILimits, OpenAIRoutes, openai_app
from moco_ray.pool.swap import hotswap as swap
from moco_ray.pool.swap.hotswap import WeightGate, WeightVersion
from moco_ray.pool.swap.sync import check_off_loop
from moco_ray.pool.swap.sync import weight_sync as make_weight_sync
from moco_ray.records import Generation, Prompt, SamplingParams, Score


@runtime_checkable
class HealthProbe(Protocol):
    """Optional engine hook: raise when the engine can no longer serve (e.g. vLLM's dead engine
    core). Engines without it are judged by their replica process alone."""

    async def check_health(self) -> None: ...


@serve.deployment(
    # Engines load in the constructor; a replica is RUNNING only once its engine answers.
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(openai_app)
class ModelServer(OpenAIRoutes):
    """Serves one pool model. `name` is the pool's name for it; `spec` builds its engine;
    `swap_registry` names the pool's `swap.SwapRegistry` (None: a server outside a pool);
    `weight_sync` the backend that loads new weights (pool/swap/sync.py); `openai_limits` what
    its HTTP routes allow (None: no API key, max_tokens bounded by max_model_len)."""

    async def __init__(self, name: str, spec: EngineSpec, swap_registry: str | None = None,
                       weight_sync: str = "disk", openai_limits: OpenAILimits | None = None):
        self.name = name
        self.openai_limits = openai_limits or OpenAILimits(max_tokens=spec.max_model_len)
        self.sync = make_weight_sync(weight_sync)  # how new weights reach this replica
        self.spec = spec
        self.model_path = spec.model
        self.engine: Engine = build_engine(spec)
        self._tokenizer = None  # loaded on the first HTTP request that asks for logprobs
        self._swap_lock = asyncio.Lock()
        self._gate = WeightGate()  # requests wait here while weights change
        self._scratch = asyncio.Condition()  # generate_with: who may swap weights, and when
        self._scratch_users = 0  # generate_with calls running on the weights served now
        self._swap_registry = swap_registry
        self.version = 0  # the pool's number for the weights served now
        self.weights_path = spec.model
        # Start the engine now (one tiny request), so that the replica turns healthy only with a
        # working engine, and the first real request does not pay for lazy initialisation.
        await self.engine.generate(["hi"], SamplingParams(max_tokens=1))
        if swap_registry is not None:
            # Last thing before serving: a replica started after a swap (autoscaling, restart)
            # comes up on the model's current version, not on the one it was deployed with.
            await self.apply_version(name, await swap.current_version(swap_registry, name))

    # --- handle methods -------------------------------------------------------------------

    async def generate(self, prompts: list[Prompt], params: SamplingParams,
                       lora: str | None = None) -> list[Generation]:
        """One Generation per prompt, stamped with this model's name and weight version."""
        if not prompts:
            return []
        async with self._gate.request():  # weights cannot change until this call is done
            t0 = time.perf_counter()
            gens = await self.engine.generate(list(prompts), params, lora)
            version = self.version
        # Name and version are the pool's. Engine time of a batched call is shared among its
        # prompts (cost accounting), unless the engine measured each one.
        share = (time.perf_counter() - t0) / len(gens)
        return [g.model_copy(update={"model": self.name, "version": version,
                                     "engine_seconds": g.engine_seconds or share})
                for g in gens]

    async def score(self, prompt: Prompt, continuations: list[str],
                    lora: str | None = None) -> list[Score]:
        async with self._gate.request():
            if lora is None:
                return await self.engine.score(prompt, list(continuations))
            return await self.engine.score(prompt, list(continuations), lora)

    async def generate_with(self, weights: str, prompts: list[Prompt],
                            params: SamplingParams) -> list[Generation]:
        """Scratch deployments only: generate with the weights dir `weights`, hot-swapping it in
        first when this replica serves other weights. Calls for the weights served now run
        together; a call for other weights waits until they drain, then swaps (one engine
        reload, never a restart). Weight-level jobs score their candidates this way."""
        if self._swap_registry is not None:
            raise ValueError(f"{self.name!r} is a pool member; generate_with serves scratch "
                             "deployments (role: scratch) only, members change weights by swap")
        async with self._scratch:
            while self.weights_path != weights and self._scratch_users:
                await self._scratch.wait()
            if self.weights_path != weights:
                await check_off_loop(self.sync, weights, self.model_path)
                await self.apply_version(self.name, WeightVersion(version=self.version + 1,
                                                                  path=weights))
            self._scratch_users += 1
        try:
            return await self.generate(prompts, params)
        finally:
            async with self._scratch:
                self._scratch_users -= 1
                self._scratch.notify_all()

    def render(self, prompt: Prompt) -> str:
        return self.engine.render(prompt)

    def info(self) -> dict:
        return {"name": self.name, "model_path": self.model_path, "version": self.version,
                "weights": self.weights_path, "engine": self.spec.kind,
                "max_model_len": self.spec.max_model_len,
                "replica": serve.get_replica_context().replica_id.unique_id}

    async def load_weights(self, path: str) -> int:
        """Swap the checkpoint at `path` in; returns the new version. In a pool this is the
        pool-wide swap (`ModelPool.swap`: every replica of this model and of its logit groups),
        since a handle call reaches one replica only; outside a pool, this replica alone."""
        if self._swap_registry is not None:
            return await swap.swap_model(self._swap_registry, self.name, path,
                                         check=self.sync.check)
        await check_off_loop(self.sync, path, self.model_path)
        return await self.apply_version(self.name, WeightVersion(version=self.version + 1,
                                                                 path=path))

    async def apply_version(self, model: str, target: WeightVersion) -> int:
        """Serve `target` on this replica (swap.py broadcasts it to all of them); a no-op when
        it already does. Returns the version served."""
        if model != self.name:
            raise ValueError(f"version of {model!r} sent to the server of {self.name!r}")
        async with self._swap_lock:
            if target.version != self.version:
                await swap.apply(self._gate, partial(self.sync.load, self.engine), target,
                                 self._commit)
        return self.version

    def _commit(self, target: WeightVersion) -> None:
        self.version, self.weights_path = target.version, target.path

    async def check_health(self) -> None:
        """Serve's periodic probe: raising marks the replica unhealthy (Serve replaces it)."""
        if isinstance(self.engine, HealthProbe):
            await self.engine.check_health()

    async def __del__(self):
        await self.engine.shutdown()

    # --- used by the HTTP routes ----------------------------------------------------------

    def decode_token(self, token_id: int) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer.decode([token_id])
