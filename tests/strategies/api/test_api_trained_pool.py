"""The API-level methods that train, for real: one tiny pool of two vLLM specialists with
enable_lora (spec-max, strong at `max`; spec-reverse, strong at `reverse`), a task mixing both,
and each method's fit training its LoRA adapter with Ray Train + DeepSpeed on dev, then serving
it per request from the live deployments on test."""
from __future__ import annotations

import asyncio
import time

import pytest
from ports import free_port as _free_port

from moco_ray.config import ModelSpec, PoolConfig
from moco_ray.strategies.api.collm import CoLLM
from moco_ray.strategies.api.switch_generation import SwitchGeneration
from moco_ray.strategies.api.trained_router import TrainedRouter
from moco_ray.strategies.base import StrategyContext
from moco_ray.tasks.base import DevSplit, Task, TestSplit
from moco_ray.tasks.synthetic import make_synthetic
from moco_ray.training.service import TrainerService

MODELS = ["maxer", "reverser"]
# Small, fast adapter training; a tiny model needs a higher lr than the default to move in
# few steps.
TRAIN = {"max_steps": 30, "lr": 1e-2}
# Three real trainings (~1.5 min each on 2 cores): run with -m slow.
pytestmark = pytest.mark.slow


def mixed_task(n_dev: int = 6, n_test: int = 4) -> Task:
    """`max` and `reverse` questions in turn: each specialist is the right model for half."""
    a, b = make_synthetic("max", n_dev, n_test), make_synthetic("reverse", n_dev, n_test)

    def mix(x, y):
        return tuple(e for pair in zip(x, y) for e in pair)

    return Task(name="max+reverse", kind="synthetic",
                dev=DevSplit(task="max+reverse", examples=mix(a.dev.examples, b.dev.examples)),
                test=TestSplit(task="max+reverse", examples=mix(a.test.examples, b.test.examples)),
                format=a.format, extract=a.extract, metric=a.metric,
                max_tokens=max(a.max_tokens, b.max_tokens))


@pytest.fixture(scope="module")
def lpool(ray_session):
    from moco_ray.pool import ModelPool

    def spec(name: str, path: str) -> ModelSpec:
        return ModelSpec(name=name, path=path, engine="vllm", dtype="float32", max_model_len=512,
                         num_cpus=0.5, enable_lora=True)

    p = ModelPool(PoolConfig(name="trainedapi", http_port=_free_port(),
                             models=[spec("maxer", "zoo:spec-max"),
                                     spec("reverser", "zoo:spec-reverse")]), seed=0)
    p.start(timeout_s=900)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def task():
    return mixed_task()


def run_job(pool, strat, task, workdir):
    """fit on dev, then every test example; returns (ctx, test records). Prints the fit time."""
    ctx = StrategyContext(pool.client(), task, MODELS, seed=0, job_id=strat.name,
                          workdir=str(workdir), trainer=TrainerService())

    async def go():
        t0 = time.perf_counter()
        await strat.fit_checked(ctx, task.dev)
        fit_s = time.perf_counter() - t0
        recs = await asyncio.gather(*(strat.run_example(ctx, ex, "test")
                                      for ex in task.test.examples))
        return fit_s, recs

    fit_s, recs = asyncio.run(go())
    train_s = {k: round(v.engine_seconds, 1) for k, v in ctx.cost.items() if k.startswith("train:")}
    print(f"\n{strat.name}: fit {fit_s:.1f} s (training {train_s}), test accuracy "
          f"{accuracy(recs):.2f}, fitted { {k: v for k, v in strat.fitted.items() if k != 'targets'} }")
    for r in recs:
        print(f"  {r.example_id}: {r.output!r} score={r.score} meta={r.meta}")
    return ctx, recs


def accuracy(recs) -> float:
    return sum(r.score for r in recs) / len(recs)


def test_trained_router_trains_and_serves_its_adapter(lpool, task, tmp_path):
    strat = TrainedRouter({**TRAIN, "temperature": 0.0})
    _, recs = run_job(lpool, strat, task, tmp_path)
    # Each specialist wins its own dev questions, so there are two labels and a router to train.
    assert set(strat.fitted["labels"]) == {0, 1}, strat.fitted["labels"]
    adapter = strat.fitted["adapter"]
    assert adapter is not None and adapter.startswith(str(tmp_path))
    for r in recs:  # the router scored both labels with its adapter; the routed model answered
        [route] = [t for t in r.trace if t.step == "route"]
        assert route.model == "maxer" and route.meta["lora"] == adapter
        [answer] = [t for t in r.trace if t.step == "answer"]
        assert answer.model == r.meta["routed_to"] and r.output == answer.output
    # The adapter, served per request from the live deployment, learned the label format.
    prompt = strat._prompt(task.prompt(task.test.examples[0]), 2)  # as the router saw it

    async def both():
        client = lpool.client()
        return (await client.score("maxer", prompt, ["Model 1", "Model 2"]),
                await client.score("maxer", prompt, ["Model 1", "Model 2"], lora=adapter))

    plain, tuned = asyncio.run(both())
    assert min(s.sum_logprob for s in tuned) > max(s.sum_logprob for s in plain) + 5.0


def test_collm_base_learns_to_defer_and_the_assistant_writes_after_the_marker(lpool, task,
                                                                              tmp_path):
    strat = CoLLM({**TRAIN, "base_model": "reverser", "assistant_model": "maxer"})
    _, recs = run_job(lpool, strat, task, tmp_path)
    # Gold answers are the references; the reverser misses max digits that maxer gets right.
    assert strat.fitted["dev_deferrals"] > 0 and strat.fitted["adapter"] is not None
    assert any(t.startswith("<defer>") for t in strat.fitted["targets"])
    adapter = strat.fitted["adapter"]
    for r in recs:
        assert "<defer>" not in r.output
        steps = [(t.step, t.model, t.meta.get("lora")) for t in r.trace]
        assert steps[0] == ("base", "reverser", adapter)
        # every assistant patch follows a base call (whose text held the marker)
        for i, (step, model, lora) in enumerate(steps):
            if step == "assistant":
                assert model == "maxer" and lora is None and steps[i - 1][0] == "base"
        assert r.meta["deferrals"] == sum(s[0] == "assistant" for s in steps)
    # Whether the base emits the 5-token marker on test after 30 CPU steps varies (measured:
    # not yet); the hand-off itself is covered with a scripted pool in
    # test_api_trained_methods.py.


def test_switch_generation_selector_trains_on_rollouts(lpool, task, tmp_path):
    strat = SwitchGeneration({**TRAIN, "patch_tokens": 2, "training_instances": 24,
                              "rollouts": 2})
    _, recs = run_job(lpool, strat, task, tmp_path)
    assert strat.fitted["train_rows"] > 0 and set(strat.fitted["labels"]) == {"0", "1"}
    adapter = strat.fitted["adapter"]
    assert adapter is not None
    for r in recs:  # before every patch the selector chose its writer with the adapter
        steps = list(r.trace)
        selects = [t for t in steps if t.step == "select"]
        patches = [t for t in steps if t.step.startswith("patch")]
        assert len(selects) == len(patches) == len(r.meta["writers"]) >= 1
        assert all(t.model == "maxer" and t.meta["lora"] == adapter for t in selects)
        assert [t.model for t in patches] == r.meta["writers"]
        assert r.output == "".join(t.output for t in patches)
