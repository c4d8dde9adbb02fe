"""The architecture guide (docs/architecture.md) and the README's Layout table stay true.

The guide's strategy skeleton is tests/guide_pkg/skeleton_strategy.py verbatim, so the code a
reader copies is code that passes config validation and runs a job here (logic only, no Ray).
"""
from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path

import pytest

from moco_ray.config import ConfigError
from moco_ray.records import Generation
from moco_ray.tasks.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "architecture.md"
SKELETON = Path(__file__).parent / "guide_pkg" / "skeleton_strategy.py"
# pytest puts tests/ on sys.path (rootdir-relative "prepend" imports: tests/ has no __init__.py),
# so the guide's package imports by this name however pytest is started.
STRATEGY = "guide_pkg.skeleton_strategy:FirstModelAnswers"


def _fenced_after(marker: str) -> str:
    """The fenced python block that follows `marker` in the guide."""
    m = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert m, f"{GUIDE.name}: no ```python block after {marker!r}"
    return m.group(1)


def test_strategy_skeleton_is_the_tested_file():
    assert _fenced_after("<!-- skeleton: strategy -->") == SKELETON.read_text(), (
        "docs/architecture.md's strategy skeleton and tests/guide_pkg/skeleton_strategy.py "
        "differ; change both together")


def test_engine_skeleton_is_an_engine():
    from moco_ray.config import EngineSpec
    from moco_ray.engines import Engine, build_engine
    from moco_ray.records import SamplingParams

    scope: dict = {}
    exec(_fenced_after("<!-- skeleton: engine -->"), scope)  # noqa: S102 (our own docs)
    engine = build_engine(EngineSpec(model="none", kind="echo"), scope["EchoEngine"])
    assert isinstance(engine, Engine)
    chat = [{"role": "user", "content": "max 1 2 ="}]
    [gen] = asyncio.run(engine.generate([chat], SamplingParams()))
    assert gen.text == "max 1 2 ="
    assert asyncio.run(engine.load_weights("/new")) == engine.version == 1


# --- the skeleton passes config validation -------------------------------------------------

def _config(params: dict) -> dict:
    return {"pool": {"models": [{"name": "a", "path": "zoo:tiny", "engine": "hf"}]},
            "tasks": [{"name": "max", "source": "synthetic", "dev_limit": 2, "test_limit": 2}],
            "jobs": [{"strategy": STRATEGY, "params": params}]}


def test_skeleton_strategy_passes_config_checks():
    from moco_ray.workflows.load import parse_config

    cfg = parse_config(_config({"max_tokens": 8}))
    assert cfg.jobs[0].strategy == STRATEGY


def test_skeleton_strategy_bad_params_are_config_errors():
    from moco_ray.workflows.load import parse_config

    with pytest.raises(ConfigError) as ei:
        parse_config(_config({"max_tokens": 0, "temprature": 0.5}))
    problems = "\n".join(ei.value.problems)
    assert "jobs.0.params.max_tokens" in problems
    assert "jobs.0.params.temprature" in problems  # a misspelt key is refused, not ignored


# --- the skeleton runs a job ---------------------------------------------------------------

class AnsweringPool:
    """PoolClient double: model "a" answers each synthetic "max" question correctly, any other
    model answers "0"; every call is kept for the test to inspect."""

    def __init__(self, models: list[str]):
        self.models = list(models)
        self.calls: list[tuple[str, int]] = []  # (model, max_tokens)

    def answer(self, model: str, question: str) -> str:
        return str(max(int(d) for d in re.findall(r"\d", question))) if model == "a" else "0"

    async def generate(self, model, prompts, params, lora=None):
        await asyncio.sleep(0)  # let concurrent examples interleave, as a real pool would
        out = []
        for p in prompts:
            self.calls.append((model, params.max_tokens))
            text = self.answer(model, p if isinstance(p, str) else p[-1]["content"])
            out.append(Generation(text=text, token_ids=[7], prompt_tokens=4,
                                  completion_tokens=1, model=model, version=3))
        return out


def test_skeleton_strategy_runs_a_job():
    from moco_ray.coordinator import JobRequest, run_job

    task = make_synthetic("max", n_dev=2, n_test=3)
    pool = AnsweringPool(["a", "b"])
    req = JobRequest(job="guide", strategy=STRATEGY, params={"max_tokens": 5}, task=task,
                     models=["a", "b"])
    records = asyncio.run(run_job(req, pool))

    questions = {ex.id: ex.question for ex in task.test.examples}
    assert sorted(r.example_id for r in records) == sorted(questions)  # one per test example
    assert pool.calls == [("a", 5)] * 3  # the first model only, with the job's params
    for r in records:
        assert (r.strategy, r.split, r.job) == ("guide_first_model", "test", "guide")
        assert r.output == pool.answer("a", questions[r.example_id])
        assert r.score == 1.0
        assert set(r.cost) == {"a"}
        assert (r.cost["a"].calls, r.cost["a"].prompt_tokens, r.cost["a"].completion_tokens) \
            == (1, 4, 1)
        assert r.model_versions == {"a": 3}
        assert [t.step for t in r.trace] == ["answer"]


# --- the guide's names match the code ------------------------------------------------------

def test_zoo_entry_point_group_is_the_one_the_zoo_reads():
    """The guide tells readers to declare training recipes under this group; the zoo must read
    the group pyproject.toml declares, or those recipes silently never load."""
    from moco_ray.models.zoo.registry import PLUGIN_GROUP

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                   .get("entry-points", {}))
    assert PLUGIN_GROUP in declared, (f"the zoo reads entry point group {PLUGIN_GROUP!r}; "
                                      f"pyproject.toml declares {sorted(declared)}")
    assert f'"{PLUGIN_GROUP}"' in GUIDE.read_text()


# --- README Layout table ---------------------------------------------------------------------

def _layout_paths() -> list[str]:
    """Every backticked path in the first column of the README's Layout table."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert m, "README.md has no '## Layout' section"
    rows = [line for line in m.group(1).splitlines() if line.startswith("| `")]
    assert rows, "README.md's Layout section has no table rows"
    return [p for row in rows for p in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_layout_table_paths_exist():
    missing = [p for p in _layout_paths() if not (ROOT / p).exists()]
    assert not missing, f"README Layout lists paths that do not exist: {missing}"


def test_layout_table_lists_every_subpackage_and_module():
    pkg = ROOT / "moco_ray"
    wanted = {f"moco_ray/{d.name}/" for d in pkg.iterdir() if (d / "__init__.py").is_file()}
    wanted |= {f"moco_ray/{f.name}" for f in pkg.glob("*.py") if f.name != "__init__.py"}
    missing = sorted(wanted - set(_layout_paths()))
    assert not missing, f"README Layout does not list: {missing}"
