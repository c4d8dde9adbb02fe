"""moco-ray command line: run | strategies | zoo."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moco_ray.config import ConfigError
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
        output_dir: str = typer.Option(None, help="override output_dir of the config"),
        fresh: bool = typer.Option(False, "--fresh", help="run every job again, ignoring the "
                                   "jobs a previous run of this config saved")) -> None:
    """Run every strategy x task of CONFIG on one pool; write records (Parquet) and a summary.

    Each job's records are saved as it ends (OUTPUT_DIR/RUN_NAME/jobs/); running the same config
    again runs only the jobs not yet finished (a job whose spec, task or pool changed runs again).
    """
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.workflows.sweep import JobsFailed, run_config

    cfg = _load(config)
    if output_dir:
        cfg = cfg.model_copy(update={"output_dir": output_dir})
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
                              f"{Path(cfg.output_dir) / cfg.run_name}/jobs: running the other "
                              f"{total - saved} (--fresh runs all)")

        try:
            result = run_config(cfg, on_progress=on_progress, resume=not fresh,
                                on_resumed=on_resumed)
        except JobsFailed as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(1) from None
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
    run_dir = resume or Path(cfg.output_dir) / cfg.run_name
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

    run_evolve(cfg, run_dir, on_stage=on_stage)
    console.print(markdown_table(generation_table(run_dir)))
    console.print(f"report: {write_report(run_dir)}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="an evolution run directory")) -> None:
    """Write RUN_DIR/report.md (tables per generation) and scores.png."""
    # per command: the workflows import ray and torch, and `moco-ray --help` should not
    from moco_ray.workflows.report import write_report

    console.print(f"wrote {write_report(run_dir)}")


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
