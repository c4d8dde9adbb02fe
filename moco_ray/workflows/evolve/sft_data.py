"""Per-model distillation data from collaboration records, as Ray Data pipelines.

    datasets = sft_datasets(ray.data.read_parquet(collab_dir), models, system="...",
                            recipe="supervised_kd", keep="correct", tasks=tasks, seed=0)
    datasets["m1"].write_parquet(...)   # or hand it to moco_ray.training.distill_all

Records come in as the Parquet rows `outputs.py` writes; every model's chat-format SFT rows
(`{"messages": [...], "source", "task", "example_id"}`) go out as a lazy Ray Dataset built with
Ray Data transforms (filter / map / union), so the rows of a large run never pass through the
driver. The driver only reads the small facts the filters need: which split the rows are from
(test rows are refused before anything else), each single model's dev answers (agreement filter,
best model), and the example keys (multi-student halves).

Recipes: `supervised_kd` gives every model the system's outputs; `multi_student_kd` adds, on a
seeded half of the dev examples, the model's own single-model outputs and, on the other half,
the best single model's (best = highest mean dev score). Filters: `all`, `correct` (score 1),
`agreement` (the output's extracted answer is held by a strict majority of the single models).

Departure from the reference (moco_distill `multi_student_kd.py`): it takes the single models'
halves from their test-set evaluation logs and picks the best single model by test score, so
test data reaches training. Here both come from single-model runs on dev, and
`refuse_test_rows` refuses any test record before a row is built. The reference's two halves
are independent random halves of each model's outputs (they may overlap, and coincide when the
model is the best one); here they split the dev examples in two.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Any

from moco_ray.outputs import records_to_table
from moco_ray.tasks.base import Task

COLUMNS = ["strategy", "task", "split", "example_id", "chat", "output", "score", "trace"]


def _plain(x: Any) -> Any:
    """Ray Data hands nested columns as numpy arrays of dicts: back to Python lists."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _single_model(row: dict) -> str | None:
    trace = _plain(row["trace"])
    return trace[0]["model"] if row["strategy"] == "single" and trace else None


def _sft_row(row: dict, source: str) -> dict:
    chat = [{"role": m["role"], "content": m["content"]} for m in _plain(row["chat"])]
    return {"messages": [*chat, {"role": "assistant", "content": row["output"]}],
            "source": source, "task": row["task"], "example_id": row["example_id"]}


class _Keep:
    """The row filter (`all`, `correct`, `agreement`) as a picklable Ray Data predicate."""

    def __init__(self, keep: str, tasks: dict[str, Task], answers: dict[tuple, Counter]):
        self.keep, self.tasks, self.answers = keep, tasks, answers

    def __call__(self, row: dict) -> bool:
        if self.keep == "correct":
            return (row["score"] or 0.0) >= 1.0
        if self.keep == "agreement":
            key = (row["task"], row["example_id"])
            task = self.tasks[row["task"]]
            ex = next(e for e in task.dev if e.id == row["example_id"])
            votes = self.answers.get(key, Counter())
            return votes[task.extract(row["output"], ex)] * 2 > sum(votes.values())
        return True


def refuse_test_rows(ds, where: str) -> None:
    """ValueError when any row is not from dev: training data never comes from test."""
    splits = set(ds.unique("split"))
    if splits - {"dev"}:
        raise ValueError(f"{where}: records from split(s) {sorted(splits - {'dev'})} reached "
                         "training data; only dev records may feed distillation (test data is "
                         "for evaluation only)")


def sft_datasets(ds, models: list[str], system: str, recipe: str, keep: str,
                 tasks: dict[str, Task], seed: int) -> dict[str, Any]:
    """{model: Ray Dataset of its SFT rows} from a Ray Dataset of record rows (dev only)."""
    if recipe not in ("supervised_kd", "multi_student_kd"):
        raise ValueError(f"recipe {recipe!r}: use 'supervised_kd' or 'multi_student_kd'")
    if keep not in ("all", "correct", "agreement"):
        raise ValueError(f"keep {keep!r}: use 'all', 'correct' or 'agreement'")
    ds = ds.select_columns(COLUMNS)
    refuse_test_rows(ds, "sft_datasets")
    need_singles = recipe == "multi_student_kd" or keep == "agreement"
    singles = ds.filter(lambda r: r["strategy"] == "single")
    # Small driver-side facts: one (model, answer, score) per single-model dev answer.
    facts = (singles.map(lambda r: {"model": _single_model(r), "task": r["task"],
                                    "example_id": r["example_id"], "output": r["output"],
                                    "score": r["score"]}).take_all() if need_singles else [])
    answers: dict[tuple, Counter] = defaultdict(Counter)
    for f in facts:
        if f["model"] in models:
            task = tasks[f["task"]]
            ex = next(e for e in task.dev if e.id == f["example_id"])
            answers[(f["task"], f["example_id"])][task.extract(f["output"], ex)] += 1
    kept = _Keep(keep, tasks, dict(answers))

    system_rows = ds.filter(lambda r: r["strategy"] == system)
    base = system_rows.filter(kept).map(lambda r: _sft_row(r, "system"))
    if recipe == "supervised_kd":
        return {m: base for m in models}

    totals: dict[str, list[float]] = defaultdict(list)
    for f in facts:
        totals[f["model"]].append(f["score"] or 0.0)
    mean = {m: sum(totals[m]) / max(len(totals[m]), 1) for m in models}
    best = max(models, key=lambda m: mean[m])
    keys = sorted({(r["task"], r["example_id"])
                   for r in system_rows.select_columns(["task", "example_id"]).take_all()})
    own_half = set(random.Random(seed).sample(keys, len(keys) // 2))
    keys_set = set(keys)
    out = {}
    for m in models:
        def mine(r: dict, m: str = m) -> bool:
            key = (r["task"], r["example_id"])
            want = m if key in own_half else best
            return key in keys_set and _single_model(r) == want

        extra = (singles.filter(mine).filter(kept)
                 .map(lambda r, m=m: _sft_row(r, "self" if _single_model(r) == m
                                              else f"best:{best}")))
        out[m] = base.union(extra)
    return out


def build_rows(records, models: list[str], system: str, recipe: str, keep: str,
               tasks: dict[str, Task], seed: int) -> dict[str, list[dict]]:
    """`sft_datasets` over in-memory Records, materialized (for tests and small runs)."""
    import ray.data

    ds = ray.data.from_arrow(records_to_table(list(records)))
    key = lambda r: (r["source"], r["task"], r["example_id"])
    return {m: sorted((_plain(r) for r in d.take_all()), key=key)
            for m, d in sft_datasets(ds, models, system, recipe, keep, tasks, seed).items()}
