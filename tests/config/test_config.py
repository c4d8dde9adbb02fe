"""Config validation: every shipped YAML parses; a bad config fails before anything starts,
with one error that names every bad key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moco_ray.config import ConfigError
from moco_ray.workflows.load import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _base() -> dict:
    return {
        "pool": {"models": [{"name": "a", "path": "zoo:tiny"}, {"name": "b", "path": "zoo:tiny-s1"}],
                 "logit_groups": [{"name": "g", "models": ["a", "b"]}]},
        "tasks": [{"name": "add", "source": "synthetic"}],
        "jobs": [{"strategy": "text_majority_vote"}],
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path):
    raw = yaml.safe_load(path.read_text())
    if "gpu" in path.parts:
        # GPU configs name hub models and the shared MoCo data; schema and strategies still check.
        from moco_ray.config import RunConfig

        RunConfig.model_validate(raw)
        return
    if "system" in raw:  # an evolution config (moco-ray evolve)
        from moco_ray.workflows.load import load_evolve

        load_evolve(path)
        return
    load_config(path)


@pytest.mark.parametrize("sweep", ["tiny_all_methods.yaml", "smollm2_all_methods.yaml"])
def test_all_methods_sweeps_cover_every_registered_strategy(sweep):
    """A method added to the registry must join both all-methods sweeps (tiny pool, SmolLM2)."""
    from moco_ray.strategies.registry import list_strategies

    # Built-in methods only: test modules register doubles of their own in the same registry.
    builtin = {n for n, cls in list_strategies().items() if cls.__module__.startswith("moco_ray.")}
    cfg = load_config(ROOT / "configs" / "sweeps" / sweep)
    assert {j.strategy for j in cfg.jobs} == builtin
    # No count kept here: every built-in method has its own module (single.py, <level>/<m>.py)
    # and its own example config under configs/strategies/.
    modules = {cls.__module__ for n, cls in list_strategies().items() if n in builtin}
    pkg = ROOT / "moco_ray" / "strategies"
    files = {"moco_ray.strategies.single"} | {
        f"moco_ray.strategies.{f.parent.name}.{f.stem}" for f in pkg.glob("*/*.py")
        if not f.name.startswith("_")}
    assert modules == files and len(modules) == len(builtin)
    assert builtin == {f.stem for f in (ROOT / "configs" / "strategies").glob("*.yaml")}


def test_valid_base_config():
    cfg = parse_config(_base())
    assert [m.name for m in cfg.pool.models] == ["a", "b"]


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["jobs"].append({"strategy": "no_such_method"}), "jobs.1.strategy"),
    (lambda c: c["pool"]["models"].append({"name": "c", "path": "/nope/model"}),
     "pool.models.2.path"),
    (lambda c: c["pool"]["models"].append({"name": "c", "path": "zoo:not-a-recipe"}),
     "pool.models.2.path"),
    (lambda c: c["jobs"].append({"strategy": "text_majority_vote",
                                 "params": {"samples_per_model": "many"}}),
     "jobs.1.params.samples_per_model"),
    (lambda c: c["jobs"].append({"strategy": "text_majority_vote", "params": {"bogus": 1}}),
     "jobs.1.params.bogus"),
    (lambda c: c["tasks"].append({"name": "no_such_task", "source": "synthetic"}), "tasks.1.name"),
    (lambda c: c["tasks"].append({"name": "no_such_task", "source": "moco"}), "tasks.1.name"),
    (lambda c: c["pool"]["models"][0].update(replicas=0), "pool.models.0.replicas"),
    (lambda c: c["pool"]["models"][0].update(engine="tgi"), "pool.models.0.engine"),
    (lambda c: c.update(extra_key=1), "extra_key"),
])
def test_bad_config_names_the_key(mutate, key):
    raw = _base()
    mutate(raw)
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    assert key in str(ei.value), str(ei.value)


def test_all_problems_reported_at_once():
    raw = _base()
    raw["jobs"] = [{"strategy": "nope1"}, {"strategy": "nope2"}]
    raw["pool"]["models"][0]["path"] = "./missing"
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    assert len(ei.value.problems) == 3


def test_logit_strategy_without_group_is_refused():
    raw = _base()
    raw["pool"]["logit_groups"] = []
    raw["jobs"] = [{"strategy": "logit_logit_fusion"}]
    with pytest.raises(ConfigError, match="jobs.0.logit_group"):
        parse_config(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates_again_after_a_dump(path):
    """A run saves its config as a dump and a resume validates that dump: a check that read
    which fields the user set (model_fields_set) would refuse the saved config of a run."""
    from moco_ray.config import EvolveConfig, RunConfig

    raw = yaml.safe_load(path.read_text())
    model = EvolveConfig if "system" in raw else RunConfig
    cfg = model.model_validate(raw)
    again = model.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again.model_dump() == cfg.model_dump()


def test_autoscaling_starts_at_min_replicas_and_survives_a_dump():
    from moco_ray.config import ModelSpec

    m = ModelSpec(name="a", path="zoo:tiny", autoscaling={"min_replicas": 2, "max_replicas": 4})
    assert m.replicas == 2
    assert ModelSpec.model_validate(m.model_dump()).replicas == 2
    with pytest.raises(ValueError, match="replicas=5 conflicts with autoscaling"):
        ModelSpec(name="a", path="zoo:tiny", replicas=5,
                  autoscaling={"min_replicas": 2, "max_replicas": 4})
