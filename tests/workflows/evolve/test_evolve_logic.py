"""Evolution-loop logic without engines: training rows, dev-only data, manifest, metrics, report."""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moco_ray.config import EvolveConfig
from moco_ray.records import Record, Turn
from moco_ray.tasks.synthetic import make_synthetic
from moco_ray.workflows.evolve.loop import dev_only, stage_names
from moco_ray.workflows.evolve.manifest import Manifest
from moco_ray.workflows.evolve.sft_data import build_rows
from moco_ray.workflows.evolve.stages import METRICS, metric_rows
from moco_ray.workflows.load import parse_evolve
from moco_ray.workflows.report import generation_table, write_report

MODELS = ["a", "b", "c"]


def _rec(strategy, model, ex, output, score, split="dev", task="max"):
    return Record(strategy=strategy, task=task, split=split, example_id=ex.id, prompt=ex.question,
                  chat=[{"role": "user", "content": ex.question}], output=output, score=score,
                  trace=[Turn(model=model, step="generate", prompt=ex.question, output=output)])


@pytest.fixture
def task():
    return make_synthetic("max", n_dev=8, n_test=4)


def _records(task):
    recs = []
    for i, ex in enumerate(task.dev):
        ok = str(ex.reference)
        recs.append(_rec("sys", "group", ex, ok if i < 6 else "x", float(i < 6)))
        recs.append(_rec("single", "a", ex, ok, 1.0))                 # a: always right
        recs.append(_rec("single", "b", ex, ok if i % 2 else "y", float(i % 2 == 1)))
        recs.append(_rec("single", "c", ex, "z", 0.0))                # c: always wrong
    return recs


def test_supervised_kd_rows_are_the_systems_correct_outputs(task, ray_session):
    rows = build_rows(_records(task), MODELS, "sys", "supervised_kd", "correct", {"max": task}, 0)
    assert set(rows) == set(MODELS)
    for m in MODELS:
        assert len(rows[m]) == 6 and all(r["source"] == "system" for r in rows[m])
        r = rows[m][0]
        assert r["messages"][0]["role"] == "user" and r["messages"][-1]["role"] == "assistant"
        assert r["messages"][-1]["content"] == str(task.dev.examples[0].reference)
    everything = build_rows(_records(task), MODELS, "sys", "supervised_kd", "all",
                            {"max": task}, 0)
    assert len(everything["a"]) == 8


def test_multi_student_kd_adds_own_and_best_single_halves(task, ray_session):
    rows = build_rows(_records(task), MODELS, "sys", "multi_student_kd", "all", {"max": task}, 0)
    for m in MODELS:
        extra = [r for r in rows[m] if r["source"] != "system"]
        assert len(extra) == 8  # one extra row per dev example: half own, half best single
        own = [r for r in extra if r["source"] == "self"]
        best = [r for r in extra if r["source"] != "self"]
        if m == "a":  # a is the best single model: all its extra rows are its own
            assert {r["source"] for r in extra} <= {"self", "best:a"}
        else:
            assert len(own) == 4 and len(best) == 4
            assert all(r["source"] == "best:a" for r in best)
    # Keeping only correct rows drops c's own (always wrong) outputs.
    kept = build_rows(_records(task), MODELS, "sys", "multi_student_kd", "correct",
                      {"max": task}, 0)
    assert not [r for r in kept["c"] if r["source"] == "self"]


def test_agreement_filter(task, ray_session):
    rows = build_rows(_records(task), MODELS, "sys", "supervised_kd", "agreement",
                      {"max": task}, 0)
    # The system agrees with a majority (a and b) on the odd examples among the first six only.
    assert len(rows["a"]) == 3


def test_training_data_cannot_come_from_test(task, ray_session):
    recs = _records(task) + [_rec("sys", "group", task.test.examples[0], "1", 1.0, split="test")]
    with pytest.raises(ValueError, match="only dev records may feed distillation"):
        build_rows(recs, MODELS, "sys", "multi_student_kd", "all", {"max": task}, 0)
    with pytest.raises(ValueError, match="split 'test'"):
        dev_only(recs, "here")


def test_multi_student_kd_trains_and_picks_the_best_single_on_dev_records_only(task,
                                                                              ray_session):
    # The reference (moco_distill) takes the single models' halves from their test-set logs and
    # picks the best single model by test score; here every row is a dev record's.
    recs = _records(task)
    dev_rows = {(r.strategy, r.trace[0].model, r.example_id, r.output) for r in recs}
    rows = build_rows(recs, MODELS, "sys", "multi_student_kd", "all", {"max": task}, 0)
    for m in MODELS:
        assert {r["source"] for r in rows[m]} > {"system"}  # the single-model halves are there
        for r in rows[m]:
            writer = {"system": ("sys", "group"), "self": ("single", m)}.get(
                r["source"], ("single", r["source"].removeprefix("best:")))
            assert (*writer, r["example_id"], r["messages"][-1]["content"]) in dev_rows
    # Single-model test runs, where c (always wrong on dev) is perfect: refused outright, so
    # they can neither add rows nor make c the best single model.
    test_singles = [_rec("single", "c", ex, str(ex.reference), 1.0, split="test")
                    for ex in task.test]
    with pytest.raises(ValueError, match="only dev records may feed distillation"):
        build_rows(recs + test_singles, MODELS, "sys", "multi_student_kd", "all",
                   {"max": task}, 0)


def test_manifest_is_atomic_and_resumable(tmp_path):
    m = Manifest(tmp_path)
    assert not m.done("eval_0")
    m.mark("eval_0", {"x": 1}, 1.5)
    again = Manifest(tmp_path)
    assert again.done("eval_0") and again.output("eval_0") == {"x": 1}
    assert stage_names(2) == ["eval_0", "collab_1", "data_1", "distill_1", "swap_1", "eval_1",
                              "collab_2", "data_2", "distill_2", "swap_2", "eval_2"]


def test_metric_rows_and_report(tmp_path, task):
    rows = []
    for g, (sa, sb, sys) in enumerate([(0.5, 0.2, 0.7), (0.6, 0.5, 0.8)]):
        recs = []
        for i, ex in enumerate(task.test):
            recs.append(_rec("single", "a", ex, "", float(i < 4 * sa), split="test"))
            recs.append(_rec("single", "b", ex, "", float(i < 4 * sb), split="test"))
            recs.append(_rec("sys", "g", ex, "", float(i < 4 * sys), split="test"))
        rows += metric_rows(recs, g, ["a", "b"])
    pq.write_table(pa.Table.from_pylist(rows, schema=METRICS), tmp_path / "metrics.parquet")
    table = generation_table(tmp_path)
    assert [r.generation for r in table] == [0, 1]
    # Scores are fractions of 4 examples: i < 4 * share scores 1.
    assert table[0].models == {"a": 0.5, "b": 0.25} and table[0].system == 0.75
    assert table[1].model_gains == {"a": 0.25, "b": 0.25}
    assert table[1].system_gain == pytest.approx(0.25)
    out = write_report(tmp_path)
    text = out.read_text()
    assert "| 1 |" in text and "scores.png" in text
    assert (tmp_path / "scores.png").stat().st_size > 1000


def test_evolve_config_errors_name_keys():
    from moco_ray.config import ConfigError

    raw = {"pool": {"models": [{"name": "a", "path": "zoo:tiny"}]},
           "tasks": [{"name": "max", "source": "synthetic"}],
           "system": {"strategy": "nope"}, "recipe": "other", "distill": {"lr": -1}}
    with pytest.raises(ConfigError) as ei:
        parse_evolve(raw)
    msg = str(ei.value)
    assert "recipe" in msg and "distill" in msg
    raw.update(recipe="supervised_kd", distill={})
    with pytest.raises(ConfigError, match="system.strategy"):
        parse_evolve(raw)
    raw["system"] = {"strategy": "text_majority_vote"}
    assert isinstance(parse_evolve(raw), EvolveConfig)


class _FakeStages:
    """Stands in for evolve_stages.Stages: records what the loop asks for."""

    calls: ClassVar[list] = []

    def __init__(self, cfg, run_dir, manifest, tasks, weights):
        pass

    def run(self, stage):
        _FakeStages.calls.append((stage,))
        return {"stage": stage}

    def run_together(self, a, b):
        _FakeStages.calls.append((a, b))
        return [{"stage": a}, {"stage": b}]

    def close(self):
        pass


@pytest.mark.parametrize("overlap", [True, False])
def test_loop_runs_eval_with_next_collab_and_resumes(tmp_path, monkeypatch, overlap):
    import moco_ray.workflows.evolve.loop as ev
    from moco_ray import models

    monkeypatch.setattr(ev, "Stages", _FakeStages)
    monkeypatch.setattr(ev, "init_ray", lambda: None)
    monkeypatch.setattr(ev, "check_run_storage", lambda paths: None)  # no Ray here
    monkeypatch.setattr(models, "resolve_path", lambda p: p)
    raw = {"pool": {"models": [{"name": "a", "path": "zoo:tiny"}]}, "generations": 2,
           "tasks": [{"name": "max", "source": "synthetic", "dev_limit": 4, "test_limit": 4}],
           "system": {"strategy": "text_majority_vote"}, "overlap": overlap}
    cfg = parse_evolve(raw)
    _FakeStages.calls = []
    seen = []
    ev.evolve(cfg, tmp_path, on_stage=seen.append, stop_after="collab_1")
    first = [("eval_0", "collab_1")] if overlap else [("eval_0",), ("collab_1",)]
    assert _FakeStages.calls == first
    assert Manifest(tmp_path).done("collab_1") and not Manifest(tmp_path).done("data_1")
    _FakeStages.calls = []
    ev.evolve(cfg, tmp_path, on_stage=seen.append)  # resume: nothing finished is redone
    rest = [("data_1",), ("distill_1",), ("swap_1",)]
    rest += [("eval_1", "collab_2")] if overlap else [("eval_1",), ("collab_2",)]
    rest += [("data_2",), ("distill_2",), ("swap_2",), ("eval_2",)]
    assert _FakeStages.calls == rest
    assert seen[0] == ("eval_0 + collab_1" if overlap else "eval_0")
    m = Manifest(tmp_path)
    assert all(m.output(s) == {"stage": s} for s in stage_names(2))


def test_only_eval_then_next_collab_overlap():
    from moco_ray.workflows.evolve.loop import overlaps

    assert overlaps(["eval_0", "collab_1"]) and overlaps(["eval_3", "collab_4"])
    assert not overlaps(["eval_1", "collab_1"]) and not overlaps(["collab_1", "data_1"])
    assert not overlaps(["eval_2"]) and not overlaps(["swap_1", "eval_1"])


def test_a_single_model_system_gets_its_own_metric_row(task):
    """system: {strategy: single}: its records look like that model's own single records; the
    job label keeps them apart (a missing "system" row crashed the report)."""
    recs = []
    for i, ex in enumerate(task.test):
        own = _rec("single", "a", ex, "", float(i < 2), split="test")
        sys = _rec("single", "a", ex, "", float(i < 3), split="test")
        recs += [own.model_copy(update={"job": "g0-test-a-max"}),
                 sys.model_copy(update={"job": "g0-test-system-max"})]
    rows = {(r["name"], r["task"]): r for r in metric_rows(recs, 0, ["a"])}
    assert rows[("a", "all")]["score"] == 0.5 and rows[("a", "all")]["kind"] == "model"
    assert rows[("system", "all")]["score"] == 0.75 and rows[("system", "all")]["kind"] == "system"
