"""`ServeClient`: the PoolClient strategies use, over Serve DeploymentHandles.

It holds only application names, so it pickles into the coordinator actor; handles are looked up
lazily in whichever process uses it (a handle made in the driver is tied to the driver's router).

A call whose replica dies under it (a killed actor, a lost node) is sent again, to a live replica
or to the one Serve starts in its place, until `retry_s` have passed: safe because every call
here is a pure function of its arguments (prompt, params, seed, weights dir). `load_weights`
alone is not retried: a swap has effects, and the pool's swap rolls back on its own.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict

from ray import serve
from ray.exceptions import RayActorError

from moco_ray.records import Generation, Prompt, SamplingParams, Score

log = logging.getLogger(__name__)

# Rendered prompts kept per model: a run revisits the same few thousand prompts at most.
RENDER_CACHE_SIZE = 4096
# How long a call keeps trying after its replica died: long enough for Serve to start a new
# replica of a large model (minutes for a 7B vLLM engine on a fresh node).
RETRY_S = 600.0


class ServeClient:
    """PoolClient over Serve: `models` are the pool's model names, `groups` its logit groups."""

    def __init__(self, apps: dict[str, str], groups: dict[str, str] | None = None,
                 scratch: dict[str, str] | None = None, retry_s: float = RETRY_S):
        self.apps = dict(apps)  # model name -> Serve application name
        self.groups = dict(groups or {})  # logit group name -> Serve application name
        self.scratch = dict(scratch or {})  # scratch deployment name -> Serve application name
        self.models = list(self.apps)
        self.retry_s = retry_s
        self.retries = 0  # calls sent again after their replica died (in this process)
        self._handles: dict[str, serve.handle.DeploymentHandle] = {}
        # model -> prompt key -> rendered text, least recently used first
        self._rendered: dict[str, OrderedDict[str, str]] = {}

    def __getstate__(self) -> dict:
        # Handles and caches stay behind: the receiving process makes its own.
        return {"apps": self.apps, "groups": self.groups, "scratch": self.scratch,
                "retry_s": self.retry_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["apps"], state["groups"], state.get("scratch"),
                      state.get("retry_s", RETRY_S))

    async def _call(self, handle, method: str, *args):
        """`handle.method.remote(*args)`, sent again while its replica dies (see the module
        docstring), with a growing pause so a restarting replica is not hammered."""
        deadline, pause = time.monotonic() + self.retry_s, 0.2
        while True:
            try:
                return await getattr(handle, method).remote(*args)
            except RayActorError as e:
                if time.monotonic() + pause > deadline:
                    raise
                self.retries += 1
                log.warning("replica died under %s (%s); sending it again in %.1f s", method,
                            type(e).__name__, pause)
                await asyncio.sleep(pause)
                pause = min(2 * pause, 5.0)

    def _handle(self, name: str, table: dict[str, str], what: str):
        if name not in table:
            raise KeyError(f"unknown {what} {name!r}; the pool has: {sorted(table)}")
        h = self._handles.get(table[name])
        if h is None:
            h = self._handles[table[name]] = serve.get_app_handle(table[name])
        return h

    def model_handle(self, model: str):
        return self._handle(model, self.apps, "model")

    def group_handle(self, group: str):
        return self._handle(group, self.groups, "logit group")

    async def generate(self, model: str, prompts: list[Prompt], params: SamplingParams,
                       lora: str | None = None) -> list[Generation]:
        return await self._call(self.model_handle(model), "generate", prompts, params, lora)

    async def score(self, model: str, prompt: Prompt, continuations: list[str],
                    lora: str | None = None) -> list[Score]:
        return await self._call(self.model_handle(model), "score", prompt, continuations, lora)

    async def generate_with(self, scratch: str, weights: str, prompts: list[Prompt],
                            params: SamplingParams) -> list[Generation]:
        h = self._handle(scratch, self.scratch, "scratch deployment")
        return await self._call(h, "generate_with", weights, prompts, params)

    async def weights_path(self, model: str) -> str:
        """The dir of the weights `model` serves now (its live version's checkpoint)."""
        return (await self.info(model))["weights"]

    async def fused_generate(self, group: str, prompts: list[Prompt], params: SamplingParams,
                             mode: str, weights: list[float]) -> list[Generation]:
        return await self._call(self.group_handle(group), "fused_generate", prompts, params, mode,
                                weights)

    async def info(self, model: str) -> dict:
        """A member's or scratch deployment's name, engine, live version and weights dir."""
        return await self._call(self._handle(model, {**self.apps, **self.scratch}, "model"),
                                "info")

    async def load_weights(self, model: str, path: str) -> int:
        return await self.model_handle(model).load_weights.remote(path)

    def render(self, model: str, prompt: Prompt) -> str:
        """The exact text `model` sees for `prompt` (chat template applied), cached per model.

        Synchronous by the PoolClient protocol, and strategies call it from the coordinator's
        event loop, so a cache miss waits on the replica without Serve's in-loop guard; the
        router runs on its own loop thread, so this cannot deadlock. Renders are cheap and
        prompts repeat (the same question goes to every model), hence the cache.
        """
        key = "s:" + prompt if isinstance(prompt, str) else "m:" + json.dumps(prompt)
        cache = self._rendered.setdefault(model, OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        text = self.model_handle(model).render.remote(prompt).result(_skip_asyncio_check=True)
        cache[key] = text
        if len(cache) > RENDER_CACHE_SIZE:
            cache.popitem(last=False)
        return text
