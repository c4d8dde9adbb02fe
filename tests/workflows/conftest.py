"""An evolution run dir built with the writers the loop uses (Manifest, SwapRegistry,
write_manifest, records_to_table, metric_rows), without a pool: for the report and lineage."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.numpy import save_file

from moco_ray.config import EvolveConfig
from moco_ray.models.checkpoint import sha256_file, write_manifest
from moco_ray.outputs import records_to_table
from moco_ray.pool.swap.hotswap import SwapRegistry
from moco_ray.records import Record, Turn
from moco_ray.workflows.evolve.manifest import Manifest
from moco_ray.workflows.evolve.stages import METRICS, metric_rows

MODELS = ["m0", "m1", "m2"]


@dataclass
class EvolutionRun:
    run_dir: Path
    base: dict[str, Path]
    sha: dict[str, dict[int, str]] = field(default_factory=dict)  # model -> gen -> sha256
    sft_rows: dict[tuple[int, str], int] = field(default_factory=dict)
    eval_scores: dict[int, dict[str, list[float]]] = field(default_factory=dict)


def _weights(d: Path, seed: int) -> str:
    """A model dir with one safetensors file; the file's sha256."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w = np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32)
    save_file({"w": w}, str(d / "model.safetensors"))
    return sha256_file(d / "model.safetensors")


def _eval(run: EvolutionRun, g: int, rng) -> dict:
    recs = []
    for name in [*MODELS, "system"]:
        scores = rng.binomial(1, 0.3 + 0.15 * g + 0.1 * (name == "system"), 20).astype(float)
        run.eval_scores.setdefault(g, {})[name] = list(scores)
        model = name if name != "system" else "m0"
        recs += [Record(generation=g, job=f"g{g}-test-{name}-t",
                        strategy="single" if name != "system" else "text_majority_vote",
                        task="t", split="test", example_id=str(i), prompt="p", output="o",
                        score=float(s), trace=[Turn(model=model, step="answer", prompt="p",
                                                    output="o")],
                        meta={"model": model} if name != "system" else {})
                 for i, s in enumerate(scores)]
    d = run.run_dir / f"gen_{g}" / "eval"
    d.mkdir(parents=True)
    pq.write_table(records_to_table(recs), d / "part-0.parquet")
    return {"records": f"runs/{run.run_dir.name}/gen_{g}/eval",
            "metrics": metric_rows(recs, g, MODELS)}


@pytest.fixture
def evolution_run(tmp_path) -> EvolutionRun:
    """Two generations of m0, m1, m2 (run dir `runs/evo`, started from `tmp_path` so that its
    manifest holds relative paths as a real run's does). Generation 2 was distilled for all;
    its swap stage was cut off: m0 swapped (v2, live), m1's swap failed (v2 failed, v1 live),
    m2 never swapped."""
    rng = np.random.default_rng(0)
    run_dir = tmp_path / "runs" / "evo"
    run_dir.mkdir(parents=True)
    base = {m: tmp_path / "zoo" / m for m in MODELS}
    run = EvolutionRun(run_dir=run_dir, base=base)
    for i, m in enumerate(MODELS):
        run.sha[m] = {0: _weights(base[m], i)}
    cfg = EvolveConfig.model_validate({
        "run_name": "evo", "generations": 2,
        "recipe": "multi_student_kd", "keep": "all",
        "pool": {"name": "p", "models": [{"name": m, "path": str(base[m])} for m in MODELS]},
        "tasks": [{"name": "t", "source": "synthetic"}],
        "system": {"strategy": "text_majority_vote"}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    manifest = Manifest(run_dir)
    registry = SwapRegistry({m: {"path": str(base[m]), "apps": []} for m in MODELS},
                            state_path=str(run_dir / "swap_registry.json"))
    metrics = []

    def evaluate(g: int) -> None:
        out = _eval(run, g, rng)
        metrics.extend(out["metrics"])
        pq.write_table(pa.Table.from_pylist(metrics, schema=METRICS),
                       run_dir / "metrics.parquet")
        manifest.mark(f"eval_{g}", out, 1.0)

    evaluate(0)
    weights = {m: str(base[m]) for m in MODELS}
    for g in (1, 2):
        manifest.mark(f"collab_{g}", {"records": f"runs/evo/gen_{g}/collab", "n": 40}, 1.0)
        data = {}
        for i, m in enumerate(MODELS):
            n = 10 * g + i
            d = run_dir / f"gen_{g}" / "data" / m
            d.mkdir(parents=True)
            pq.write_table(pa.table({"source": ["system"] * n}), d / "part-0.parquet")
            data[m] = {"path": f"runs/evo/gen_{g}/data/{m}", "n": n}
            run.sft_rows[(g, m)] = n
        manifest.mark(f"data_{g}", {"data": data}, 1.0)
        ckpts = {}
        for i, m in enumerate(MODELS):
            out = run_dir / f"gen_{g}" / "checkpoints" / m
            run.sha[m][g] = _weights(out, 10 * g + i)
            write_manifest(out, {"model": m, "base_model": weights[m], "method": "lora",
                                 "output": "merged", "steps": 2, "final_loss": 0.5 / g})
            ckpts[m] = str(out)
        manifest.mark(f"distill_{g}", {"checkpoints": ckpts}, 1.0)
        if g == 1:
            for m in MODELS:
                registry.propose(m, ckpts[m])
                weights[m] = ckpts[m]
            manifest.mark("swap_1", {"versions": dict.fromkeys(MODELS, 1)}, 1.0)
            evaluate(1)
        else:  # cut off mid-swap
            registry.propose("m0", ckpts["m0"])
            registry.propose("m1", ckpts["m1"])
            registry.mark_failed("m1", 2, "replica refused: tensor shapes differ")
            registry.activate("m1", 1)
    return run
