"""`moco-ray report RUN_DIR`: report.md with per-generation tables and a PNG plot of scores."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from pydantic import BaseModel


class GenRow(BaseModel):
    """One generation: each model's and the system's test score on the task mix, and gains."""

    generation: int
    models: dict[str, float]
    system: float
    best_single: float
    system_gain: float  # system - best single model, same generation
    model_gains: dict[str, float]  # each model - its generation-0 self


def generation_table(run_dir: str | Path, task: str = "all") -> list[GenRow]:
    path = Path(run_dir) / "metrics.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no evaluation has finished in {run_dir}")
    rows = [r for r in pq.read_table(path).to_pylist() if r["task"] == task]
    gens = sorted({r["generation"] for r in rows})
    base = {r["name"]: r["score"] for r in rows if r["generation"] == 0 and r["kind"] == "model"}
    out = []
    for g in gens:
        models = {r["name"]: r["score"] for r in rows
                  if r["generation"] == g and r["kind"] == "model"}
        system = next(r["score"] for r in rows if r["generation"] == g and r["kind"] == "system")
        best = max(models.values())
        out.append(GenRow(generation=g, models=models, system=system, best_single=best,
                          system_gain=system - best,
                          model_gains={m: s - base.get(m, s) for m, s in models.items()}))
    return out


def tasks_of(run_dir: str | Path) -> list[str]:
    table = pq.read_table(Path(run_dir) / "metrics.parquet", columns=["task"])
    return sorted(set(table.column("task").to_pylist()) - {"all"})


def markdown_table(rows: list[GenRow]) -> str:
    names = list(rows[0].models)
    head = ["gen", *names, "system", "best single", "system - best", "min model gain vs gen 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.generation), *(f"{r.models[n]:.3f}" for n in names), f"{r.system:.3f}",
                 f"{r.best_single:.3f}", f"{r.system_gain:+.3f}",
                 f"{min(r.model_gains.values()):+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[GenRow], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [r.generation for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in rows[0].models:
        ax.plot(gens, [r.models[name] for r in rows], marker="o", label=name)
    ax.plot(gens, [r.system for r in rows], marker="s", linewidth=2.5, color="black",
            label="system")
    ax.set_xlabel("generation")
    ax.set_ylabel("test score (task mix)")
    ax.set_xticks(gens)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    rows = generation_table(run_dir)
    parts = [f"# moco_ray evolution report: {run_dir.name}", "",
             "Test scores per generation on the task mix (mean over all test examples).", "",
             markdown_table(rows), "", "![scores per generation](scores.png)", ""]
    for task in tasks_of(run_dir):
        parts += [f"## {task}", "", markdown_table(generation_table(run_dir, task)), ""]
    plot(rows, run_dir / "scores.png", f"{run_dir.name}: test score per generation")
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out
