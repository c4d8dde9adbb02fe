"""`moco-ray report RUN_DIR`: report.md and a self-contained report.html for a sweep run
(`moco-ray run`) or an evolution run (`moco-ray evolve`), read from the run dir alone.

Sweep: a strategy x task pivot of test scores with 95% bootstrap CIs, the best single model per
task (picked on dev scores where dev records exist), how often collaboration beats it (paired
bootstrap over the shared test examples), cost beside every score, and per task a plot of score
against cost with the Pareto frontier. Evolution: scores per generation (metrics.parquet) with
a plot, per-model CIs from each generation's eval records, and the models' lineage.

Statistics: percentile bootstrap over examples (2000 resamples, seed 0) of the mean score; a
missing score (None) counts as 0, as in the sweep summary.
"""
from __future__ import annotations

import base64
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import yaml
from markdown_it import MarkdownIt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moco_ray.outputs import read_records
from moco_ray.records import Cost, Record
from moco_ray.workflows.lineage import lineage, markdown

RESAMPLES, SEED, LEVEL = 2000, 0, 0.95
FILES = "report_files"  # plots of report.md, beside it (report.html embeds them)


# --- statistics -------------------------------------------------------------------------------

class Interval(BaseModel):
    """A mean with its percentile bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def text(self, signed: bool = False) -> str:
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(self.mean)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def bootstrap_ci(values, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> Interval:
    """Mean of `values` and the percentile bootstrap CI of the mean (resampling examples with
    replacement; vectorized, in batches of about 4M drawn indices to bound memory)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    batch = max(1, 2**22 // n)
    for start in range(0, resamples, batch):
        k = min(batch, resamples - start)
        means[start:start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return Interval(mean=float(x.mean()), lo=float(lo), hi=float(hi), n=n)


def paired_difference(a: dict[str, float], b: dict[str, float], **kw) -> Interval | None:
    """Mean of a[id] - b[id] over the ids both have, with its bootstrap CI (resampling ids);
    None when they share no id."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    return bootstrap_ci([a[i] - b[i] for i in ids], **kw)


def verdict(diff: Interval) -> Literal["win", "tie", "loss"]:
    """win: the CI of the difference lies above 0; loss: below; tie: it contains 0."""
    return "win" if diff.lo > 0 else "loss" if diff.hi < 0 else "tie"


def pareto_front(costs: list[float], scores: list[float]) -> list[int]:
    """Indices of the points no other point dominates (cost <= and score >=, one strictly),
    by cost, then score descending. Lower cost and higher score are better."""
    pts = list(zip(costs, scores))
    front = [i for i, (c, s) in enumerate(pts)
             if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2 in pts)]
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1]))


# --- prices -----------------------------------------------------------------------------------

class Price(BaseModel):
    """Dollars per 1000 tokens of one model (or logit group, or scratch deployment)."""

    model_config = ConfigDict(extra="forbid")
    prompt: float = Field(ge=0)
    completion: float = Field(ge=0)


class PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prices: dict[str, Price]


def load_prices(path: str | Path) -> dict[str, Price]:
    """`prices: {name: {prompt: $/1k, completion: $/1k}}` from a YAML file; ValueError naming
    each problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prices file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
        return PriceFile.model_validate(raw).prices
    except yaml.YAMLError as e:
        raise ValueError(f"prices file {str(path)!r} is not valid YAML: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors())
        raise ValueError(f"prices file {str(path)!r}: {problems} (expected `prices: {{MODEL: "
                         "{prompt: $ per 1k tokens, completion: $ per 1k tokens}}}`)") from None


def dollars(cost: dict[str, Cost], prices: dict[str, Price]) -> float:
    return sum(c.prompt_tokens / 1000 * prices[m].prompt
               + c.completion_tokens / 1000 * prices[m].completion for m, c in cost.items())


# --- sweep runs -------------------------------------------------------------------------------

class SweepJob(BaseModel):
    job: str
    records: list[Record]
    wall_seconds: float | None = Field(None, description="the job's wall time (all its splits, "
                                       "fit included); None when the run dir does not say")


def load_sweep(run_dir: Path) -> tuple[list[SweepJob], str, list[str]]:
    """(finished jobs, where they were read from, notes on unfinished jobs). Finished jobs come
    from `jobs/` (JobStore: `<job>.parquet` + `<job>.json` with its status); a run dir without
    them falls back to its newest `records-*` dataset (no wall times there)."""
    jobs_dir = run_dir / "jobs"
    metas = sorted(jobs_dir.glob("*.json")) if jobs_dir.is_dir() else []
    if metas:
        jobs, notes = [], []
        for meta in metas:
            data = meta.with_suffix(".parquet")
            status = json.loads(meta.read_text())["status"]
            if not data.is_file():
                notes.append(f"{meta.stem}: status saved but no records file")
                continue
            jobs.append(SweepJob(job=meta.stem, records=read_records(data),
                                 wall_seconds=status.get("seconds")))
        for part in sorted(jobs_dir.glob("*.partial")):
            job = part.name.removesuffix(".partial")
            if not (jobs_dir / f"{job}.json").is_file():
                n = sum(pq.read_metadata(f).num_rows for f in part.glob("*.parquet"))
                notes.append(f"{job}: unfinished ({n} records so far), left out")
        return jobs, f"{jobs_dir} ({len(jobs)} finished jobs)", notes
    sets = sorted(p for p in run_dir.glob("records-*") if p.is_dir())
    whole = [p for p in sets if not p.name.endswith("-partial")]
    if not sets:
        raise FileNotFoundError(f"{run_dir} has no jobs/*.json and no records-* dataset")
    src = (whole or sets)[-1]
    by_job: dict[str, list[Record]] = defaultdict(list)
    for r in read_records(src):
        by_job[r.job].append(r)
    notes = [] if whole else [f"{src.name} is a partial run's records (some jobs failed)"]
    return [SweepJob(job=j, records=rs) for j, rs in by_job.items()], str(src), notes


class Cell(BaseModel):
    """One setting: one job's test records on one task, their score and cost."""

    label: str
    task: str
    strategy: str
    model: str | None = Field(None, description="the model of a `single` job")
    score: Interval
    dev: float | None = Field(None, description="mean dev score, when the job ran on dev")
    prompt_tokens: int
    completion_tokens: int
    engine_seconds: float
    wall_seconds: float | None
    dollars: float | None
    scores: dict[str, float] = Field(description="test example id -> score")

    def cost_per_example(self, priced: bool) -> float:
        return (self.dollars if priced else self.engine_seconds) / self.score.n


class BestSingle(BaseModel):
    task: str
    label: str
    model: str | None
    basis: Literal["dev", "test"] = Field(description="the split it was picked on")


class Comparison(BaseModel):
    label: str
    task: str
    best: str
    diff: Interval
    verdict: Literal["win", "tie", "loss"]


class SweepAnalysis(BaseModel):
    cells: list[Cell]
    best: dict[str, BestSingle]
    comparisons: list[Comparison]
    priced: bool


def _label(job: str, strategy: str, task: str) -> str:
    """The job's config name (`<i>-<name>-<task>` is how sweep.job_ids names jobs)."""
    m = re.fullmatch(rf"\d+-(.+)-{re.escape(task)}", job)
    return m[1] if m else job or strategy


def _single_model(records: list[Record]) -> str | None:
    r = records[0]
    if isinstance(r.meta.get("model"), str):
        return r.meta["model"]
    return r.trace[0].model if r.trace else next(iter(r.cost), None)


def analyze_sweep(jobs: list[SweepJob], prices: dict[str, Price] | None = None
                  ) -> SweepAnalysis:
    """Cells, the best single model per task and every collaboration-vs-best comparison."""
    if prices is not None:
        used = {m for j in jobs for r in j.records for m in r.cost}
        missing = sorted(used - set(prices))
        if missing:
            raise ValueError(f"prices are missing for {missing} (names as they appear in the "
                             "records' cost: pool models, logit groups, scratch deployments); "
                             "give each a price, 0 for free ones")
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    wall = {j.job: j.wall_seconds for j in jobs}
    for j in jobs:
        for r in j.records:
            groups[(j.job, r.task)].append(r)
    labels = {key: _label(key[0], recs[0].strategy, key[1]) for key, recs in groups.items()}
    # Two jobs with one name on one task: tell them apart by their job id.
    dup = {k for k in labels if sum(labels[o] == labels[k] and o[1] == k[1] for o in labels) > 1}
    cells = []
    for key in sorted(groups, key=_job_order):
        recs = groups[key]
        test = [r for r in recs if r.split == "test"]
        dev = [r for r in recs if r.split == "dev"]
        if not test:
            continue
        cost: dict[str, Cost] = defaultdict(Cost)
        for r in test:
            for m, c in r.cost.items():
                cost[m] = cost[m].add(c)
        scores = {r.example_id: r.score or 0.0 for r in test}
        strategy = test[0].strategy
        cells.append(Cell(
            label=key[0].removesuffix(f"-{key[1]}") if key in dup else labels[key],
            task=key[1], strategy=strategy,
            model=_single_model(test) if strategy == "single" else None,
            score=bootstrap_ci(list(scores.values())),
            dev=sum(r.score or 0.0 for r in dev) / len(dev) if dev else None,
            prompt_tokens=sum(c.prompt_tokens for c in cost.values()),
            completion_tokens=sum(c.completion_tokens for c in cost.values()),
            engine_seconds=sum(c.engine_seconds for c in cost.values()),
            wall_seconds=wall.get(key[0]),
            dollars=dollars(cost, prices) if prices is not None else None, scores=scores))
    best = {}
    for task in dict.fromkeys(c.task for c in cells):
        singles = [c for c in cells if c.task == task and c.strategy == "single"]
        if not singles:
            continue
        on_dev = all(c.dev is not None for c in singles)
        pick = max(singles, key=lambda c: c.dev if on_dev else c.score.mean)
        best[task] = BestSingle(task=task, label=pick.label, model=pick.model,
                                basis="dev" if on_dev else "test")
    comparisons = []
    for c in cells:
        if c.strategy == "single" or c.task not in best:
            continue
        base = next(b for b in cells if b.task == c.task and b.label == best[c.task].label)
        diff = paired_difference(c.scores, base.scores)
        if diff is not None:
            comparisons.append(Comparison(label=c.label, task=c.task, best=base.label, diff=diff,
                                          verdict=verdict(diff)))
    return SweepAnalysis(cells=cells, best=best, comparisons=comparisons,
                         priced=prices is not None)


def _job_order(key: tuple[str, str]) -> tuple:
    m = re.match(r"(\d+)-", key[0])
    return (int(m[1]) if m else 1 << 30, key[0], key[1])


def headline(a: SweepAnalysis) -> str:
    n = {v: sum(c.verdict == v for c in a.comparisons) for v in ("win", "tie", "loss")}
    text = (f"Collaboration beats the best single model in {n['win']} of "
            f"{len(a.comparisons)} settings (95% CI of the paired difference above 0); "
            f"{n['tie']} ties (CI contains 0), {n['loss']} losses (CI below 0).")
    alone = sorted({c.task for c in a.cells} - set(a.best))
    if alone:
        text += f" Not counted: tasks without a single-model job ({', '.join(alone)})."
    return text


# --- rendering --------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _cost_note(c: Cell, priced: bool) -> str:
    return f"${c.dollars:.4f}" if priced else f"{c.engine_seconds:.1f} engine-s"


def _figure():
    import matplotlib  # slow to import; only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _figure()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def pareto_plot(cells: list[Cell], task: str, priced: bool) -> bytes:
    """Test score against cost per test example for the settings of one task, the Pareto
    frontier drawn through its points (PNG bytes)."""
    plt = _figure()
    xs = [c.cost_per_example(priced) for c in cells]
    ys = [c.score.mean for c in cells]
    front = pareto_front(xs, ys)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, c in enumerate(cells):
        on = i in front
        ax.errorbar(xs[i], ys[i], yerr=[[ys[i] - c.score.lo], [c.score.hi - ys[i]]],
                    fmt="o" if c.strategy != "single" else "s", capsize=3,
                    color="tab:red" if on else "tab:gray", alpha=1.0 if on else 0.7)
        ax.annotate(c.label, (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="tab:red",
            linewidth=1.2, label="Pareto frontier")
    ax.set_xlabel("$ per test example" if priced else "engine-seconds per test example")
    ax.set_ylabel("test score (95% CI)")
    ax.set_title(f"{task}: score vs cost (squares: single models)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def sweep_markdown(run_dir: Path, a: SweepAnalysis, source: str, notes: list[str]
                   ) -> tuple[str, dict[str, bytes]]:
    """The sweep report's Markdown and its plots ({relative path: PNG})."""
    tasks = list(dict.fromkeys(c.task for c in a.cells))
    labels = list(dict.fromkeys(c.label for c in a.cells))
    at = {(c.label, c.task): c for c in a.cells}
    cost_name = "$" if a.priced else "engine-seconds"
    parts = [f"# moco_ray sweep report: {run_dir.name}", "",
             (f"Read from {source}. Scores are means over test examples with 95% percentile "
             f"bootstrap CIs ({RESAMPLES} resamples over examples, seed {SEED}); a missing "
             "score counts as 0."), ""]
    parts += [f"- note: {n}" for n in notes] + ([""] if notes else [])
    parts += ["## Headline", "", headline(a), ""]
    if any(b.basis == "test" for b in a.best.values()):
        parts += [("† The best single model of a task marked † was picked on TEST scores (its "
                  "jobs have no dev records): an optimistic baseline, so wins against it are "
                  "conservative. Run single jobs with `splits: [dev, test]` to pick on dev."), ""]
    parts += ["## Test score by strategy and task", "",
              f"Each cell: mean [95% CI] · {cost_name} over the task's test examples.", ""]
    parts.append(_table(["setting", *tasks], [
        [lab, *(f"{at[(lab, t)].score.text()} · {_cost_note(at[(lab, t)], a.priced)}"
                if (lab, t) in at else "–" for t in tasks)] for lab in labels]))
    parts += ["", "## Best single model per task", ""]
    parts.append(_table(["task", "best single", "model", "picked on", "test score [95% CI]"], [
        [b.task, b.label, b.model or "–", b.basis + (" †" if b.basis == "test" else ""),
         at[(b.label, b.task)].score.text()] for b in a.best.values()]))
    images = {}
    for t in tasks:
        cells = [c for c in a.cells if c.task == t]
        best = a.best.get(t)
        parts += ["", f"## {t}", ""]
        head = ["setting", "strategy", "n", "test score [95% CI]", "dev score", "prompt tok",
                "compl tok", "engine-s", "wall-s"] + (["$"] if a.priced else [])
        rows = []
        for c in cells:
            name = c.label + (" (best single)" if best and c.label == best.label else "")
            rows.append([name, c.strategy, str(c.score.n), c.score.text(),
                         _num(c.dev, "{:.3f}"), str(c.prompt_tokens), str(c.completion_tokens),
                         f"{c.engine_seconds:.1f}", _num(c.wall_seconds)]
                        + ([f"{c.dollars:.4f}"] if a.priced else []))
        parts.append(_table(head, rows))
        parts += ["", "wall-s is the whole job's wall time (all its splits, fit included)."]
        comps = [c for c in a.comparisons if c.task == t]
        if comps:
            parts += ["", (f"Against the best single model ({comps[0].best}), paired over "
                      "shared test examples:"), ""]
            parts.append(_table(["setting", "difference [95% CI]", "n", "verdict"], [
                [c.label, c.diff.text(signed=True), str(c.diff.n), c.verdict] for c in comps]))
        rel = f"{FILES}/pareto-{_safe(t)}.png"
        images[rel] = pareto_plot(cells, t, a.priced)
        front = pareto_front([c.cost_per_example(a.priced) for c in cells],
                             [c.score.mean for c in cells])
        parts += ["", f"![{t}: score vs cost]({rel})", "",
                  "Pareto frontier (cheapest first): "
                  + ", ".join(cells[i].label for i in front), ""]
    return "\n".join(parts) + "\n", images


# --- evolution runs ---------------------------------------------------------------------------

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
    plt = _figure()
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


def eval_scores(run_dir: Path) -> dict[int, dict[str, dict[tuple[str, str], float]]]:
    """generation -> single model name or 'system' -> (task, example id) -> test score, from
    each generation's eval records (`gen_<g>/eval`)."""
    out: dict[int, dict[str, dict[tuple[str, str], float]]] = {}
    for d in sorted(run_dir.glob("gen_*/eval")):
        if not any(d.rglob("*.parquet")):
            continue
        g = int(d.parent.name.removeprefix("gen_"))
        by: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
        for r in read_records(d):
            name = _single_model([r]) if r.strategy == "single" else "system"
            by[name][(r.task, r.example_id)] = r.score or 0.0
        out[g] = dict(by)
    return dict(sorted(out.items()))


def evolution_intervals_markdown(scores: dict[int, dict[str, dict[tuple[str, str], float]]]
                                 ) -> str:
    """Per generation: each model's and the system's mean [95% CI] on the task mix and each
    task, and the system minus the best single model (picked on test), paired by example."""
    tasks = sorted({t for by in scores.values() for s in by.values() for t, _ in s})
    parts = []
    for g, by in scores.items():
        rows = []
        for name, s in sorted(by.items(), key=lambda kv: (kv[0] == "system", kv[0])):
            row = [name, bootstrap_ci(list(s.values())).text()]
            for t in tasks:
                vals = [v for (tt, _), v in s.items() if tt == t]
                row.append(bootstrap_ci(vals).text() if vals else "–")
            rows.append(row)
        singles = {n: s for n, s in by.items() if n != "system"}
        if singles and "system" in by:
            best = max(singles, key=lambda n: np.mean(list(singles[n].values())))
            diff = paired_difference({str(k): v for k, v in by["system"].items()},
                                     {str(k): v for k, v in singles[best].items()})
            if diff is not None:
                rows.append([f"system - {best} †", diff.text(signed=True) + f" {verdict(diff)}",
                             *["" for _ in tasks]])
        parts += [f"### generation {g}", "", _table(["", "all", *tasks], rows), ""]
    return "\n".join(parts)


def evolution_markdown(run_dir: Path) -> tuple[str, dict[str, bytes]]:
    rows = generation_table(run_dir)
    parts = [f"# moco_ray evolution report: {run_dir.name}", "",
             "Test scores per generation on the task mix (mean over all test examples).", "",
             markdown_table(rows), "", "![scores per generation](scores.png)", ""]
    for task in tasks_of(run_dir):
        parts += [f"## {task}", "", markdown_table(generation_table(run_dir, task)), ""]
    plot(rows, run_dir / "scores.png", f"{run_dir.name}: test score per generation")
    scores = eval_scores(run_dir)
    if scores:
        parts += ["## 95% confidence intervals", "",
                  (f"Mean test score [95% percentile bootstrap CI, {RESAMPLES} resamples over "
                  f"examples, seed {SEED}] from each generation's eval records. † the system "
                  "minus the best single model of that generation, paired by example; the best "
                  "is picked on test (eval runs no dev), an optimistic baseline."), "",
                  evolution_intervals_markdown(scores)]
    if (run_dir / "manifest.json").is_file():
        parts += ["## Lineage", "", ("Each model's versions: what produced them, from which "
                                     "parent, and the sha256 of their weight files as their "
                                     "checkpoint manifests recorded them (`moco-ray lineage "
                                     "RUN_DIR` also hashes the starting weights)."), "",
                  markdown(lineage(run_dir, hash_files=False)), ""]
    return "\n".join(parts) + "\n", {"scores.png": (run_dir / "scores.png").read_bytes()}


# --- entry ------------------------------------------------------------------------------------

def run_kind(run_dir: Path) -> Literal["sweep", "evolution"]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {str(run_dir)!r} not found")
    if (run_dir / "manifest.json").is_file() or (run_dir / "metrics.parquet").is_file():
        return "evolution"
    if (run_dir / "jobs").is_dir() or any(p.is_dir() for p in run_dir.glob("records-*")):
        return "sweep"
    raise FileNotFoundError(f"{run_dir} is neither a sweep run dir (jobs/, records-*/ from "
                            "`moco-ray run`) nor an evolution run dir (manifest.json, "
                            "metrics.parquet from `moco-ray evolve`)")


def to_html(markdown_text: str, images: dict[str, bytes], title: str) -> str:
    """One HTML page from the report's Markdown, its images embedded as base64 PNG."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    for rel, data in images.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        body = body.replace(f'src="{rel}"', f'src="{uri}"')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_escape(title)}"
            f"</title><style>{style}</style></head><body>\n{body}</body></html>\n")


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_report(run_dir: str | Path, prices: dict[str, Price] | None = None) -> Path:
    """Write report.md (plots beside it) and report.html (self-contained) into `run_dir`;
    returns the report.md path. `prices` ($ per 1k tokens per model) adds $ to a sweep's cost."""
    run_dir = Path(run_dir)
    if run_kind(run_dir) == "evolution":
        text, images = evolution_markdown(run_dir)
    else:
        jobs, source, notes = load_sweep(run_dir)
        analysis = analyze_sweep(jobs, prices)
        if not analysis.cells:
            raise ValueError(f"{run_dir}: no finished job has test records to report on")
        text, images = sweep_markdown(run_dir, analysis, source, notes)
        for rel, data in images.items():
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / rel).write_bytes(data)
    out = run_dir / "report.md"
    out.write_text(text)
    (run_dir / "report.html").write_text(to_html(text, images, f"moco_ray report: {run_dir.name}"))
    return out
