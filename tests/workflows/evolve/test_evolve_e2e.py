"""The evolution loop end to end on tiny models, with a real kill and a resume.

`moco-ray evolve` runs in a subprocess on a pool of two tiny zoo models; it is SIGKILLed once the
`swap_1` stage is recorded (the distilled checkpoints hot-swapped into the live pool), then
`moco-ray evolve --resume` finishes the run. Stages done before the kill are not redone (their
manifest entries are untouched); the resumed pool comes back on the swapped weights under the
same version numbers (eval records of generation 1 carry version 1 of every model, from the
persisted swap registry), and the report is written.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from moco_ray.workflows.lineage import lineage

CONFIG = {
    "run_name": "e2e", "seed": 0, "concurrency": 16, "generations": 1,
    "recipe": "multi_student_kd", "keep": "all",
    "pool": {"name": "evo", "http_port": 0, "models": [
        {"name": "m0", "path": "zoo:tiny", "engine": "vllm", "dtype": "float32",
         "max_model_len": 256, "num_cpus": 0.5},
        {"name": "m1", "path": "zoo:tiny-s1", "engine": "hf", "dtype": "float32",
         "max_model_len": 256, "num_cpus": 0.5}]},
    "tasks": [{"name": "max", "source": "synthetic", "dev_limit": 8, "test_limit": 6}],
    "system": {"strategy": "text_majority_vote", "params": {"temperature": 0.0,
                                                            "max_tokens": 6}},
    "distill": {"method": "lora", "zero_stage": 2, "lr": 1e-3, "max_steps": 2,
                "batch_size": 4, "max_seq_len": 48, "num_workers": 1, "cpus_per_worker": 0.5},
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moco_ray.cli", *args]


def _manifest(run_dir: Path) -> dict:
    p = run_dir / "manifest.json"
    return json.loads(p.read_text())["stages"] if p.exists() else {}


@pytest.mark.timeout(1500)
def test_evolve_killed_then_resumed(tmp_path, _zoo_cache):
    cfg = dict(CONFIG, storage=str(tmp_path / "runs"))
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "runs" / "e2e"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MOCO_RAY_CACHE": _zoo_cache}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (the child process writes to it)
    proc = subprocess.Popen(_cli("evolve", str(path)), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while "swap_1" not in _manifest(run_dir):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "swap_1 never finished"
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: driver and its local Ray
    proc.wait()
    before = _manifest(run_dir)
    assert "swap_1" in before and "eval_1" not in before
    assert before["swap_1"]["output"]["versions"] == {"m0": 1, "m1": 1}

    done = subprocess.run(_cli("evolve", "--resume", str(run_dir)), env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = _manifest(run_dir)
    for stage, entry in before.items():  # finished stages were not redone
        assert after[stage]["finished"] == entry["finished"], stage
    assert [s for s in after] == list(before) + [s for s in after if s not in before]
    assert set(after) == {"eval_0", "collab_1", "data_1", "distill_1", "swap_1", "eval_1"}

    # Every model was distilled into a checkpoint the pool served in generation 1.
    ckpts = after["distill_1"]["output"]["checkpoints"]
    assert set(ckpts) == {"m0", "m1"} and all(Path(p, "config.json").exists()
                                              for p in ckpts.values())
    eval1 = pq.read_table(after["eval_1"]["output"]["records"]).to_pylist()
    assert eval1 and all(r["split"] == "test" for r in eval1)
    versions = {(m, v) for r in eval1 for m, v in r["model_versions"]}
    assert versions == {("m0", 1), ("m1", 1)}, versions
    eval0 = pq.read_table(after["eval_0"]["output"]["records"]).to_pylist()
    assert {(m, v) for r in eval0 for m, v in r["model_versions"]} == {("m0", 0), ("m1", 0)}
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert {r["generation"] for r in metrics} == {0, 1}
    assert {r["name"] for r in metrics} == {"m0", "m1", "system"}
    collab = pq.read_table(after["collab_1"]["output"]["records"]).to_pylist()
    assert {r["split"] for r in collab} == {"dev"}
    assert "report:" in done.stdout and (run_dir / "report.md").exists()
    assert (run_dir / "report.html").exists()

    # Lineage of the real run: v0 -> v1 per model, its rows and hashes as the run wrote them.
    tree = lineage(run_dir, verify=True)
    for m in ("m0", "m1"):
        v0, v1 = tree[m]
        assert (v0.version, v0.generation, v1.version, v1.generation, v1.parent) == \
            (0, 0, 1, 1, 0)
        assert v1.live and v1.verified == "ok" and v1.strategy == "text_majority_vote"
        assert v1.sft.rows == after["data_1"]["output"]["data"][m]["n"]
        assert v1.sha256 == json.loads(Path(ckpts[m], "moco_checkpoint.json").read_text())["files"]
