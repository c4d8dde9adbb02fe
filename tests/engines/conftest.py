"""Fixtures for the engine tests: real tiny models built by the zoo into a temp cache, one event
loop for the session, one HF engine and one vLLM engine shared by the tests.

vLLM's AsyncLLM spawns its engine core (tens of seconds on a 2-core CPU), so the session starts
it once, in the background, as soon as a collected test needs it; the tests that need it run last.
"""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from moco_ray import models
from moco_ray.config import EngineSpec
from moco_ray.engines.hf import HFEngine

# Two cores shared with other jobs: one torch thread avoids OpenMP oversubscription (measured:
# 0.2 s vs 10 s for the same small batch under load). Ray workers get 1 thread the same way.
torch.set_num_threads(1)

MAX_LEN = 512


def _vllm_fixtures(item) -> set[str]:
    """Which shared vLLM engines a test needs ('vllm_engine', 'vllm_lora_engine')."""
    names = set(getattr(item, "fixturenames", ())) & {"vllm_engine", "vllm_lora_engine"}
    if "[vllm]" in item.nodeid:  # the parametrized `engine` fixture
        names.add("vllm_engine")
    return names


def _needs_vllm(item) -> bool:
    return bool(_vllm_fixtures(item)) or "vllm" in item.nodeid


def pytest_collection_modifyitems(session, config, items):
    # Engine tests that need vLLM run after the others, while its engine core starts meanwhile.
    here = os.path.dirname(__file__)
    mine = [i for i in items if str(i.path).startswith(here)]
    if not mine:
        return
    ordered = sorted(mine, key=_needs_vllm)  # stable: keeps file order within each group
    slots = [n for n, i in enumerate(items) if str(i.path).startswith(here)]
    for n, item in zip(slots, ordered):
        items[n] = item


@pytest.fixture(scope="session")
def zoo_cache(_zoo_cache):
    """The session's private zoo cache (tests/conftest.py), never the user's."""
    return _zoo_cache


@pytest.fixture(scope="session")
def tiny(zoo_cache) -> str:
    return models.resolve_path("zoo:tiny")


@pytest.fixture(scope="session")
def tiny_s1(zoo_cache) -> str:
    """Same architecture as `tiny`, other weights (seed 1): the swap target."""
    return models.resolve_path("zoo:tiny-s1")


@pytest.fixture(scope="session")
def loop():
    """One loop for the session: AsyncLLM's output handler and HFEngine's batch worker live on
    the loop that first used them."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.run_until_complete(_cancel_leftovers())
    lp.close()


async def _cancel_leftovers() -> None:
    """Like asyncio.run's cleanup: cancel what is left (e.g. batch workers of test engines)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(scope="session")
def run(loop):
    return loop.run_until_complete


@pytest.fixture(scope="session")
def hf_engine(tiny, run):
    eng = HFEngine(EngineSpec(model=tiny, kind="hf", dtype="float32", max_model_len=MAX_LEN))
    yield eng
    run(eng.shutdown())


class _VLLMStarter:
    """Starts shared vLLM engines in the background; `get` waits for one to be ready."""

    def __init__(self, loop, tiny):
        self.loop, self.tiny, self.started = loop, tiny, {}

    def start(self, name: str) -> None:
        from moco_ray.engines.vllm import VLLMEngine

        if name in self.started:
            return
        lora = name == "vllm_lora_engine"
        eng = VLLMEngine(EngineSpec(model=self.tiny, kind="vllm", dtype="float32",
                                    max_model_len=MAX_LEN, enable_lora=lora, max_lora_rank=8))
        self.started[name] = (eng, self.loop.create_task(eng.start()))
        self.loop.run_until_complete(asyncio.sleep(0.05))  # hands the build to its thread

    def get(self, name: str):
        self.start(name)
        eng, task = self.started[name]
        self.loop.run_until_complete(task)
        return eng

    def close(self) -> None:
        for eng, task in self.started.values():
            if not task.done():
                self.loop.run_until_complete(task)
            self.loop.run_until_complete(eng.shutdown())


@pytest.fixture(scope="session")
def _vllm(loop, tiny):
    starter = _VLLMStarter(loop, tiny)
    yield starter
    starter.close()


@pytest.fixture(scope="session", autouse=True)
def _prestart_vllm(request):
    wanted = set().union(*(_vllm_fixtures(i) for i in request.session.items))
    if wanted:
        starter = request.getfixturevalue("_vllm")
        for name in sorted(wanted):
            starter.start(name)


@pytest.fixture(scope="session")
def vllm_engine(_vllm):
    """The shared vLLM engine on the tiny model (no LoRA: prompt_logprobs scoring)."""
    return _vllm.get("vllm_engine")


@pytest.fixture(scope="session")
def vllm_lora_engine(_vllm):
    """The shared vLLM engine with LoRA enabled (stepwise scoring, see VLLMEngine.score)."""
    return _vllm.get("vllm_lora_engine")


@pytest.fixture(params=["hf", "vllm"])
def engine(request):
    """Each behaviour test runs on both engines (the same tiny model)."""
    return request.getfixturevalue(f"{request.param}_engine")
