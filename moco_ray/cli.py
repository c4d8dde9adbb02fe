"""moco-ray command line: run | evolve | report | lineage | plan | strategies | zoo."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moco_ray.config import ConfigError, validate_schema
from moco_ray.workflows.load import load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Model collaboration on Ray: pools, strategies, evolution.")
console = Console()


def _load(config: Path):
    try:
        return load_config(config)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command()
def run(config: Path = typer.Argument(..., help="run config YAML (pool, tasks, jobs)"),
        storage: str = typer.Option(None, "--storage", "--output-dir",
                                    help="override storage of the config: the root of the run's "
                                    "files (--output-dir: its old name)"),
        fresh: bool = typer.Option(False, "--fresh", help="run every job again, ignoring the "
                                   "jobs a previous run of this config saved")) -> None:
    """Run every strategy x task of CONFIG on one pool; write records (Parquet) and a summary.

    Each job's records are saved as it ends (STORAGE/RUN_NAME/jobs/); running the same config
    again runs only the jobs not yet finished (a job whose spec, task or pool changed runs again).
    """
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.workflows.sweep import JobsFailed, run_config

    cfg = _load(config)
    if storage:  # validated as the config's own key is (a URI is refused)
        try:
            cfg = validate_schema(type(cfg), {**cfg.model_dump(exclude_unset=True),
                                              "storage": storage}, "--storage")
        except ConfigError as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2) from None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bars: dict[str, int] = {}

        def on_progress(st, _new):
            if st.job not in bars:
                bars[st.job] = progress.add_task(st.job, total=st.total)
            progress.update(bars[st.job], completed=st.done)

        def on_resumed(saved, total):
            if saved:
                console.print(f"{saved} of {total} jobs already finished in "
                              f"{Path(cfg.storage) / cfg.run_name}/jobs: running the other "
                              f"{total - saved} (--fresh runs all)")

        try:
            result = run_config(cfg, on_progress=on_progress, resume=not fresh,
                                on_resumed=on_resumed)
        except JobsFailed as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(1) from None
        except ConfigError as e:  # storage not shared by every node (checked at start-up)
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2) from None
    table = Table(title=f"{cfg.run_name}: {len(result.records)} records -> {result.out_dir}")
    for col in ("strategy", "task", "split", "n", "score", "prompt tok", "compl tok", "seconds"):
        table.add_column(col, justify="left" if col in ("strategy", "task", "split") else "right")
    for r in result.summary:
        table.add_row(r.strategy, r.task, r.split, str(r.n), f"{r.score:.3f}",
                      str(r.prompt_tokens), str(r.completion_tokens), f"{r.seconds:.1f}")
    console.print(table)


@app.command()
def evolve(config: Path = typer.Argument(None, help="evolution config YAML"),
           resume: Path = typer.Option(None, "--resume", help="continue the run in RUN_DIR at "
                                       "its first unfinished stage")) -> None:
    """The single-multi loop: collaborate on dev -> distill every model -> hot-swap -> evaluate."""
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.workflows.evolve.loop import evolve as run_evolve
    from moco_ray.workflows.load import load_evolve
    from moco_ray.workflows.report import generation_table, markdown_table, write_report

    if (config is None) == (resume is None):
        console.print("[red]give CONFIG, or --resume RUN_DIR (not both)[/red]")
        raise typer.Exit(2)
    try:
        cfg = load_evolve(config if config else resume / "config.yaml")
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    run_dir = resume or Path(cfg.storage) / cfg.run_name
    if config and (run_dir / "manifest.json").exists():
        console.print(f"[red]{run_dir} already holds a run; continue it with --resume {run_dir} "
                      "or pick another run_name[/red]")
        raise typer.Exit(2)
    shown: set[int] = set()

    def on_stage(stage: str) -> None:
        console.print(f"[bold]stage {stage}[/bold]")
        if (run_dir / "metrics.parquet").exists():
            for row in generation_table(run_dir):
                if row.generation not in shown:
                    shown.add(row.generation)
                    console.print(markdown_table([row]))

    try:
        run_evolve(cfg, run_dir, on_stage=on_stage)
    except ConfigError as e:  # storage not shared by every node (checked at start-up)
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    console.print(markdown_table(generation_table(run_dir)))
    console.print(f"report: {write_report(run_dir)}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a sweep (`run`) or evolution run directory"),
           prices: Path = typer.Option(None, "--prices", help="YAML file `prices: {MODEL: "
                                       "{prompt: $/1k tokens, completion: $/1k tokens}}`: "
                                       "adds $ to a sweep's cost (every model, logit group "
                                       "and scratch deployment in the records' cost needs "
                                       "one)")) -> None:
    """Write RUN_DIR/report.md and a self-contained report.html; reads only RUN_DIR.

    Sweep: test scores per strategy x task with 95% bootstrap CIs and cost, the best single
    model per task, wins/ties/losses of collaboration against it, score-vs-cost plots with the
    Pareto frontier. Evolution: scores per generation, CIs, and the models' lineage.
    """
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.workflows.report import load_prices, run_kind, write_report

    try:
        table = load_prices(prices) if prices else None
        if table is not None and run_kind(run_dir) == "evolution":
            console.print("[yellow]--prices is used for sweep runs only[/yellow]")
        console.print(f"wrote {write_report(run_dir, table)} and report.html")
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command()
def lineage(run_dir: Path = typer.Argument(..., help="an evolution run directory"),
            model: str = typer.Argument(None, help="one model (default: every model)"),
            as_json: bool = typer.Option(False, "--json", help="print JSON, not a tree"),
            verify: bool = typer.Option(False, "--verify", help="rehash each checkpoint's "
                                        "weight files against its manifest")) -> None:
    """The version tree of each model of an evolution run: generation, strategy, SFT rows,
    parent version and the sha256 of the weight files that made each version."""
    import json

    from moco_ray.workflows.lineage import as_json as lineage_json
    from moco_ray.workflows.lineage import lineage as model_lineage
    from moco_ray.workflows.lineage import rich_tree

    try:
        tree = model_lineage(run_dir, model, verify=verify)
    except (FileNotFoundError, KeyError) as e:
        console.print(f"[red]{e.args[0] if isinstance(e, KeyError) else e}[/red]")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(lineage_json(tree), indent=1))
    else:
        # Wide enough that no path or hash is wrapped or cut (a terminal soft-wraps them whole).
        Console(width=max(console.width, 1000)).print(
            rich_tree(tree, f"{run_dir.name}: model versions"))


@app.command()
def plan(config: Path = typer.Argument(..., help="run or evolve config YAML"),
         cluster: str = typer.Option(..., "--cluster", help="NODESxGPUSxMEMORY, e.g. 2x8x80GB "
                                     "(2 nodes of 8 80 GB GPUs), 1x1x40GB, or 2x0 (CPU only)")
         ) -> None:
    """Where CONFIG's replicas, logit groups and trainers would go on CLUSTER (node, GPU ids),
    with each GPU's memory budget; a config that does not fit exits with 1. Starts nothing."""
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.workflows.plan import plan_file, tables

    try:
        result = plan_file(config, cluster)
    except (ConfigError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    for table in tables(result):
        console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", style="yellow", markup=False)
    if not result.fits:
        console.print(f"does not fit {result.cluster}:\n  - " + "\n  - ".join(result.problems),
                      style="red", markup=False)
        raise typer.Exit(1)
    console.print(f"fits {result.cluster}", style="green", markup=False)


@app.command()
def strategies() -> None:
    """List every registered strategy with its level and one line."""
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.strategies.registry import list_strategies

    table = Table("name", "level", "what")
    for name, cls in list_strategies().items():
        doc = (cls.summary or (cls.__doc__ or "").strip().splitlines()[0:1] or [""])
        table.add_row(name, cls.level, doc if isinstance(doc, str) else doc[0])
    console.print(table)


@app.command()
def zoo(name: str = typer.Argument(..., help="zoo recipe, e.g. tiny or smollm2-135m-instruct")
        ) -> None:
    """Build (or find cached) a zoo model and print its directory."""
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.models import zoo as zoo_mod

    console.print(zoo_mod.resolve_path(name if name.startswith("zoo:") else f"zoo:{name}"))


if __name__ == "__main__":
    app()
