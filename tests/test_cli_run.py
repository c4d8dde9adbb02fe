"""`moco-ray run` end to end: a real pool (vLLM + transformers engines, a logit group), the
coordinator, records in Parquet, a summary table; bad configs fail before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moco_ray.config import default_data_dir
from moco_ray.outputs import read_records

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None, timeout=900):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "moco_ray.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def _records(out_dir: Path):
    [path] = sorted(out_dir.glob("records-*"))
    return read_records(path)


def test_bad_config_fails_fast_naming_keys(tmp_path):
    raw = yaml.safe_load((ROOT / "configs/sweeps/tiny_sweep.yaml").read_text())
    raw["jobs"].append({"strategy": "text_majority_votes"})
    raw["jobs"].append({"strategy": "api_cascade", "params": {"order": 3}})
    raw["pool"]["models"][0]["path"] = "/no/such/model"
    raw["tasks"].append({"name": "gsm9k", "source": "moco"})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    t0 = time.monotonic()
    res = _run(["run", str(bad), "--storage", str(tmp_path / "runs")])
    assert res.returncode == 2
    out = res.stdout + res.stderr
    for key in ("jobs.7.strategy", "jobs.8.params.order", "pool.models.0.path", "tasks.3.name"):
        assert key in out, out
    assert "text_majority_vote" in out  # the valid names are listed
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written
    assert time.monotonic() - t0 < 60


def test_run_tiny_pool_all_first_strategies(tmp_path, _zoo_cache):
    res = _run(["run", str(ROOT / "configs/sweeps/tiny_sweep.yaml"), "--storage",
                str(tmp_path / "runs")], {"MOCO_RAY_CACHE": _zoo_cache})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    recs = _records(tmp_path / "runs" / "tiny-sweep")
    strategies = {r.strategy for r in recs}
    assert strategies == {"single", "text_majority_vote", "text_multiagent_refine",
                          "api_cascade", "logit_logit_fusion"}
    assert len(recs) == 7 * 3 * 12
    assert all(r.split == "test" and r.trace and r.cost for r in recs)
    # The summary table lists every job with its score.
    assert "logit_logit_fusion" in res.stdout and "tiny-sweep" in res.stdout
    by = {}
    for r in recs:
        by.setdefault((r.job.split("-", 1)[1].rsplit("-", 1)[0]), []).append(r.score)
    mean = {k: sum(v) / len(v) for k, v in by.items()}
    # The fused specialists beat every single one on the task mix.
    assert mean["logit_logit_fusion"] > max(mean[f"single-{m}"] for m in
                                            ("reverser", "maxer", "sorter")), mean


# Slow (over 4 min on 2 cores): the default suite covers SmolLM2 through tests/engines.
@pytest.mark.slow
@pytest.mark.skipif(not default_data_dir().is_dir(), reason="../shared/data/moco is absent")
def test_run_smollm2_on_moco_tasks_vllm(tmp_path, _zoo_cache):
    res = _run(["run", str(ROOT / "configs/sweeps/smollm2_moco.yaml"), "--storage",
                str(tmp_path / "runs")], {"MOCO_RAY_CACHE": _zoo_cache}, timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    recs = _records(tmp_path / "runs" / "smollm2-moco")
    assert {r.task for r in recs} == {"arc_challenge", "gsm8k"}
    assert len(recs) == 3 * 2 * 4
    vllm_recs = [r for r in recs if r.job.startswith("0-single-vllm")]
    assert vllm_recs and all(r.cost["smol-vllm"].completion_tokens > 0 for r in vllm_recs)
    # A real instruct model writes real text (not empty, not one repeated token).
    texts = [r.output for r in vllm_recs]
    assert sum(len(set(t.split())) > 5 for t in texts) >= len(texts) // 2, texts


# Slow (about 15 min on 2 cores): every method through `moco-ray run` on one tiny pool, then a
# rerun of the same config that takes every job back from the run's saved jobs.
@pytest.mark.slow
def test_run_every_method_on_tiny_pool_and_resume(tmp_path, _zoo_cache):
    from moco_ray.strategies.registry import list_strategies

    cfg = ROOT / "configs/sweeps/tiny_all_methods.yaml"
    out = tmp_path / "runs"
    res = _run(["run", str(cfg), "--storage", str(out)], {"MOCO_RAY_CACHE": _zoo_cache},
               timeout=3000)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    recs = _records(out / "tiny-all-methods")
    assert {r.strategy for r in recs} == {n for n, c in list_strategies().items()
                                          if c.__module__.startswith("moco_ray.")}
    assert len(recs) == 31 * 2 * 8 and all(r.trace and r.score is not None for r in recs)
    # Every job was saved as it ended; the rerun runs none of them and starts no pool.
    assert len(list((out / "tiny-all-methods" / "jobs").glob("*.parquet"))) == 31 * 2
    for p in (out / "tiny-all-methods").glob("records-*"):
        import shutil

        shutil.rmtree(p)
    t0 = time.monotonic()
    again = _run(["run", str(cfg), "--storage", str(out)], {"MOCO_RAY_CACHE": _zoo_cache})
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "62 of 62 jobs already finished" in again.stdout
    assert time.monotonic() - t0 < 120
    assert sorted((r.job, r.example_id, r.output) for r in _records(out / "tiny-all-methods")) \
        == sorted((r.job, r.example_id, r.output) for r in recs)
