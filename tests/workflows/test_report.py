"""`moco-ray report` on sweep and evolution run dirs built with the real writers (JobStore,
write_records, the evolve stages' metric rows) from synthetic records: the numbers in the
report, the bootstrap, the Pareto frontier, the self-contained HTML and the CLI."""
from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from moco_ray.cli import app
from moco_ray.config import RunConfig
from moco_ray.coordinator import JobStatus
from moco_ray.outputs import write_records
from moco_ray.records import Cost, Record, Turn
from moco_ray.workflows.jobstore import JobStore
from moco_ray.workflows.report import (
    analyze_sweep,
    bootstrap_ci,
    load_sweep,
    paired_difference,
    pareto_front,
    verdict,
    write_report,
)
from moco_ray.workflows.sweep import job_ids

N = 40  # test examples per task
rng = np.random.default_rng(7)
HALF = [1.0] * (N // 2) + [0.0] * (N // 2)
# Test scores per (job name, task). On t1, single-b is better on test but single-a on dev:
# the best single model is picked on dev (single-a). t2 has no dev records: picked on test.
TEST = {
    ("single-a", "t1"): HALF,
    ("single-b", "t1"): [1.0] * 30 + [0.0] * 10,
    ("single-a", "t2"): [1.0] * 24 + [0.0] * 16,
    ("single-b", "t2"): [1.0] * 10 + [0.0] * 30,
    ("good", "t1"): [1.0] * N,          # clearly beats single-a everywhere
    ("good", "t2"): [1.0] * N,
    ("same", "t1"): HALF,               # single-a's own scores: a tie
    ("same", "t2"): [1.0] * 24 + [0.0] * 16,
    ("bad", "t1"): [0.0] * N,           # clearly loses
    ("bad", "t2"): [0.0] * N,
}
DEV = {("single-a", "t1"): 0.9, ("single-b", "t1"): 0.2}
JOBS = [{"name": "single-a", "strategy": "single", "params": {"model": "a"},
         "splits": ["dev", "test"]},
        {"name": "single-b", "strategy": "single", "params": {"model": "b"},
         "splits": ["dev", "test"]},
        {"name": "good", "strategy": "text_majority_vote"},
        {"name": "same", "strategy": "text_multiagent_refine"},
        {"name": "bad", "strategy": "api_cascade"}]


def _config(jobs: list[dict]) -> RunConfig:
    return RunConfig.model_validate({
        "run_name": "sweep",
        "pool": {"name": "p", "models": [{"name": "a", "path": "zoo:tiny"},
                                         {"name": "b", "path": "zoo:tiny"}]},
        "tasks": [{"name": "t1", "source": "synthetic"}, {"name": "t2", "source": "synthetic"}],
        "jobs": jobs})


def _record(job: str, strategy: str, name: str, task: str, split: str, i: int,
            score: float) -> Record:
    models = [name.removeprefix("single-")] if strategy == "single" else ["a", "b"]
    cost = {m: Cost(calls=1, prompt_tokens=int(rng.integers(10, 50)),
                    completion_tokens=int(rng.integers(1, 20)),
                    engine_seconds=float(rng.uniform(0.01, 0.2))) for m in models}
    return Record(run="sweep", job=job, strategy=strategy, task=task, split=split,
                  example_id=f"{task}-{i}", prompt=f"q{i}", output="x", score=score,
                  trace=[Turn(model=m, step="answer", prompt=f"q{i}", output="x")
                         for m in models], cost=cost,
                  meta={"model": models[0]} if strategy == "single" else {})


def _job_records(cfg: RunConfig) -> dict[str, list[Record]]:
    out = {}
    for job, spec, task in job_ids(cfg):
        recs = [_record(job, spec.strategy, spec.name, task, "test", i, s)
                for i, s in enumerate(TEST[(spec.name, task)])]
        if (spec.name, task) in DEV:
            p = DEV[(spec.name, task)]
            recs += [_record(job, spec.strategy, spec.name, task, "dev", i, float(i < p * 10))
                     for i in range(10)]
        out[job] = recs
    return out


@pytest.fixture
def sweep_dir(tmp_path):
    """A sweep run dir as `moco-ray run` leaves it: every job saved by the JobStore (records +
    status), plus one job still running (only partial parts)."""
    cfg = _config(JOBS)
    out = tmp_path / "runs" / "sweep"
    store = JobStore(out, cfg)
    recs = _job_records(cfg)
    for job, spec, task in job_ids(cfg):
        st = JobStatus(job=job, state="done", done=len(recs[job]), total=len(recs[job]),
                       seconds=float(len(job)))
        store.save(st, recs[job], store.fingerprint(spec, task))
    extra = _config([*JOBS, {"name": "running", "strategy": "text_majority_vote"}])
    job, spec, task = job_ids(extra)[-1]
    store.append(job, [_record(job, spec.strategy, "running", task, "test", i, 1.0)
                       for i in range(3)], JobStore(out, extra).fingerprint(spec, task))
    return out, recs


def test_bootstrap_ci_contains_the_mean_narrows_with_n_and_is_seeded():
    x = rng.binomial(1, 0.3, size=1000).astype(float)
    small, large = bootstrap_ci(x[:30]), bootstrap_ci(x)
    assert small.lo <= x[:30].mean() <= small.hi and large.lo <= x.mean() <= large.hi
    assert large.hi - large.lo < small.hi - small.lo
    # Close to the normal approximation for a large sample.
    sd = x.std() / np.sqrt(len(x))
    assert abs((large.hi - large.lo) - 2 * 1.96 * sd) < 0.2 * 2 * 1.96 * sd
    assert bootstrap_ci(x[:30]) == small  # fixed seed: the same interval every time
    assert bootstrap_ci([0.5]).lo == bootstrap_ci([0.5]).hi == 0.5
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_paired_difference_uses_shared_ids_only():
    a = {"1": 1.0, "2": 1.0, "3": 0.0, "only-a": 5.0}
    b = {"1": 0.0, "2": 1.0, "3": 0.0, "only-b": -5.0}
    d = paired_difference(a, b)
    assert d.n == 3 and d.mean == pytest.approx(1 / 3)
    assert paired_difference({"x": 1.0}, {"y": 1.0}) is None
    same = paired_difference(a, a)
    assert (same.lo, same.hi) == (0.0, 0.0) and verdict(same) == "tie"
    assert verdict(paired_difference({str(i): 1.0 for i in range(30)},
                                     {str(i): 0.0 for i in range(30)})) == "win"


def test_pareto_front():
    costs = [1.0, 2.0, 3.0, 2.0, 0.5, 3.0, 4.0]
    scores = [0.5, 0.7, 0.9, 0.6, 0.2, 0.9, 0.8]
    # 3 is dominated by 1 (same cost, lower score); 6 by 2 and 5; 2 and 5 tie (both stay).
    assert pareto_front(costs, scores) == [4, 0, 1, 2, 5]
    assert pareto_front([1.0], [0.0]) == [0]
    assert pareto_front([], []) == []


def test_sweep_report_numbers(sweep_dir):
    run_dir, recs = sweep_dir
    jobs, source, notes = load_sweep(run_dir)
    assert "jobs" in source and len(jobs) == len(JOBS) * 2
    assert any("running" in n and "3 records" in n for n in notes)
    a = analyze_sweep(jobs)
    cells = {(c.label, c.task): c for c in a.cells}
    assert set(cells) == set(TEST)  # the unfinished job is left out
    for job, rs in recs.items():
        test = [r for r in rs if r.split == "test"]
        c = cells[(job.split("-", 1)[1].rsplit("-", 1)[0], test[0].task)]
        assert c.score.mean == pytest.approx(np.mean([r.score for r in test]))
        assert c.score.lo <= c.score.mean <= c.score.hi and c.score.n == N
        assert c.prompt_tokens == sum(x.prompt_tokens for r in test for x in r.cost.values())
        assert c.engine_seconds == pytest.approx(sum(x.engine_seconds for r in test
                                                     for x in r.cost.values()))
        assert c.wall_seconds == float(len(job))
    assert cells[("single-a", "t1")].dev == pytest.approx(0.9)
    # Best single: on dev where dev records exist (single-a, though single-b wins on test).
    assert (a.best["t1"].label, a.best["t1"].basis, a.best["t1"].model) == ("single-a", "dev",
                                                                            "a")
    assert (a.best["t2"].label, a.best["t2"].basis) == ("single-a", "test")
    verdicts = {(c.label, c.task): c.verdict for c in a.comparisons}
    assert verdicts == {("good", "t1"): "win", ("good", "t2"): "win", ("same", "t1"): "tie",
                        ("same", "t2"): "tie", ("bad", "t1"): "loss", ("bad", "t2"): "loss"}

    md_path = write_report(run_dir)
    md = md_path.read_text()
    assert "beats the best single model in 2 of 6 settings" in md
    assert "2 ties" in md and "2 losses" in md
    assert "† The best single model" in md  # t2's best was picked on test
    # The pivot shows every cell's mean and CI beside its cost.
    c = cells[("good", "t2")]
    assert f"{c.score.text()} · {c.engine_seconds:.1f} engine-s" in md
    assert (run_dir / "report_files" / "pareto-t1.png").stat().st_size > 1000
    # good (score 1) is on t1's frontier; bad (score 0) is only if it is the cheapest.
    front = re.search(r"## t1.*?Pareto frontier \(cheapest first\): ([^\n]*)", md, re.DOTALL)[1]
    assert "good" in front.split(", ")


def test_report_html_is_self_contained(sweep_dir):
    run_dir, _ = sweep_dir
    write_report(run_dir)
    html = (run_dir / "report.html").read_text()
    assert "<table>" in html and 'src="data:image/png;base64,' in html
    assert 'src="http' not in html and "report_files/" not in html
    assert not re.search(r'(src|href)="(?!data:)', html)


def test_report_cli_with_prices(sweep_dir, tmp_path):
    run_dir, recs = sweep_dir
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"prices": {"a": {"prompt": 1.0, "completion": 2.0},
                                                 "b": {"prompt": 0.5, "completion": 0.0}}}))
    res = CliRunner().invoke(app, ["report", str(run_dir), "--prices", str(prices)])
    assert res.exit_code == 0, res.output
    md = (run_dir / "report.md").read_text()
    test = [r for r in recs["2-good-t1"] if r.split == "test"]
    usd = sum(c.prompt_tokens / 1000 * {"a": 1.0, "b": 0.5}[m]
              + c.completion_tokens / 1000 * {"a": 2.0, "b": 0.0}[m]
              for r in test for m, c in r.cost.items())
    assert f"${usd:.4f}" in md and "$ per test example" not in md  # plot label, not markdown

    prices.write_text(yaml.safe_dump({"prices": {"a": {"prompt": 1.0, "completion": 2.0}}}))
    res = CliRunner().invoke(app, ["report", str(run_dir), "--prices", str(prices)])
    assert res.exit_code == 2 and "['b']" in res.output
    prices.write_text(yaml.safe_dump({"prices": {"a": {"prompt": -1, "completion": 2.0}}}))
    res = CliRunner().invoke(app, ["report", str(run_dir), "--prices", str(prices)])
    assert res.exit_code == 2 and "prices.a.prompt" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not found" in " ".join(res.output.split())


def test_sweep_without_jobstore_reads_records_dataset(sweep_dir, ray_session):
    """An older sweep dir (only `records-<stamp>/`, written by Ray Data) reports the same
    scores; wall times are unknown there."""
    run_dir, recs = sweep_dir
    from_jobs = analyze_sweep(load_sweep(run_dir)[0])
    old = run_dir.parent / "old"
    write_records([r for rs in recs.values() for r in rs], old / "records-20250101-000000")
    jobs, source, _ = load_sweep(old)
    assert "records-20250101-000000" in source
    a = analyze_sweep(jobs)
    assert [(c.label, c.task, c.score) for c in a.cells] == \
        [(c.label, c.task, c.score) for c in from_jobs.cells]
    assert all(c.wall_seconds is None for c in a.cells)
    write_report(old)
    assert "| – |" in (old / "report.md").read_text()


def test_evolution_report_has_intervals_and_lineage(evolution_run):
    run_dir = evolution_run.run_dir
    md = write_report(run_dir).read_text()
    assert "![scores per generation](scores.png)" in md and (run_dir / "scores.png").exists()
    # Per-model CIs from the eval records of each generation.
    for g, by_model in evolution_run.eval_scores.items():
        for model, scores in by_model.items():
            assert f"| {model} | {bootstrap_ci(scores).text()} |" in md, (g, model)
    assert "## Lineage" in md and evolution_run.sha["m0"][1] in md
    # Starting weights (no manifest) are not hashed by the report; `moco-ray lineage` does.
    assert evolution_run.sha["m0"][0] not in md and "not hashed" in md
    html = (run_dir / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and 'src="http' not in html
    assert len(pq.read_table(run_dir / "metrics.parquet")) > 0
