"""Load a `TaskSpec` into a `Task`: MoCo task files, JSONL, Hugging Face datasets, synthetic tasks.

Every source yields raw rows in MoCo's shape (the column names can be remapped with
`options.columns`), and one converter (rows.py) turns them into `Example`s, so a bad row gets the
same error (file, split, row, id, key) wherever it comes from. `known_task` is the cheap check that
config validation runs before anything loads.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moco_ray.config import TaskSpec, default_data_dir
from moco_ray.tasks import metrics, prompts
from moco_ray.tasks.base import DevSplit, Task, TestSplit
from moco_ray.tasks.rows import COLUMN_ROLES, KINDS, is_numeric_answer, normalize_kind, to_examples
from moco_ray.tasks.sandbox import SandboxLimits
from moco_ray.tasks.synthetic import SYNTHETIC_TASKS, make_synthetic

# Room for a short chain of thought before the marked answer; popqa answers are a few words.
DEFAULT_MAX_TOKENS = {"multiple_choice": 256, "exact_match": 512, "f1": 128, "code": 512}
SYNTHETIC_DEFAULT_ROWS = 200
_DEV_SPLITS = ("validation", "dev", "valid", "val")


class TaskOptions(BaseModel):
    """`TaskSpec.options`, checked so that a misspelt key is an error rather than ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description=f"role -> column; roles: {sorted(COLUMN_ROLES)}")
    numeric_answer: bool | None = Field(None, description="exact match: reduce answers to a "
                                        "number (default: when every reference is a number)")
    split_column: str = Field("split", description="jsonl: column holding dev/test")
    dev_path: str | None = Field(None, description="jsonl: dev file (with test_path)")
    test_path: str | None = None
    dev_split: str | None = Field(None, description="hf: dev split (default validation/dev)")
    test_split: str = Field("test", description="hf: test split")
    load_kwargs: dict[str, Any] = Field(default_factory=dict, description="hf: load_dataset kwargs")
    task: str | None = Field(None, description="synthetic: generator (default: the task name)")
    seed: int = Field(0, description="synthetic: which questions are drawn")
    code_timeout_s: float = Field(10.0, gt=0, description="code: wall seconds per program")
    code_memory_mb: int = Field(512, ge=64, description="code: memory per program")


def _options(spec: TaskSpec) -> TaskOptions:
    try:
        opts = TaskOptions.model_validate(spec.options)
    except ValidationError as e:
        bad = "; ".join(f"options.{'.'.join(map(str, er['loc']))}: {er['msg']}"
                        for er in e.errors())
        raise ValueError(bad) from None
    unknown = sorted(set(opts.columns) - set(COLUMN_ROLES))
    if unknown:
        raise ValueError(f"options.columns has unknown roles {unknown}; "
                         f"roles: {sorted(COLUMN_ROLES)}")
    return opts


# MoCo task files inside the current directory: where `ray job submit --working-dir .` ships
# them (a job runs in its unpacked working dir).
SHIPPED_DATA = Path("data") / "moco"


def moco_data_dir() -> Path:
    """Where MoCo task files are read: $MOCO_RAY_DATA; else ./data/moco when that folder exists
    under the current directory (task files shipped with the job); else ../shared/data/moco
    beside the repo (`default_data_dir`)."""
    if not os.environ.get("MOCO_RAY_DATA"):
        shipped = Path.cwd() / SHIPPED_DATA
        if shipped.is_dir():
            return shipped
    return default_data_dir()


def _moco_path(spec: TaskSpec, data_dir: Path | None) -> Path:
    if spec.path:
        return Path(spec.path)
    return Path(data_dir or moco_data_dir()) / f"{spec.name}.json"


def known_task(spec: TaskSpec, data_dir: Path | None = None) -> str | None:
    """Why `spec` cannot load (naming the valid choices), or None. Reads no task data."""
    problem = _problem(spec, data_dir)
    return problem[1] if problem else None


def _problem(spec: TaskSpec, data_dir: Path | None) -> tuple[type[Exception], str] | None:
    try:
        opts = _options(spec)
    except ValueError as e:
        return ValueError, str(e)
    if spec.source == "synthetic":
        gen = opts.task or spec.name
        if gen not in SYNTHETIC_TASKS:
            return ValueError, (f"unknown synthetic task {gen!r}; synthetic tasks: "
                                f"{sorted(SYNTHETIC_TASKS)}")
        return None
    if spec.kind is not None and normalize_kind(spec.kind) is None:
        return ValueError, f"unknown kind {spec.kind!r}; kinds: {list(KINDS)}"
    if spec.source in ("jsonl", "hf") and spec.kind is None:
        return ValueError, f"a {spec.source} task needs `kind`, one of {list(KINDS)}"
    if spec.source == "moco":
        path = _moco_path(spec, data_dir)
        if path.is_file():
            return None
        if not path.parent.is_dir():
            return FileNotFoundError, (f"MoCo data folder {path.parent} does not exist; set "
                                       "MOCO_RAY_DATA, put the task files in ./data/moco, or "
                                       "give the task file as `path`")
        names = sorted(p.stem for p in path.parent.glob("*.json"))
        return FileNotFoundError, f"no MoCo task file {path}; tasks in {path.parent}: {names}"
    if spec.source == "jsonl":
        try:
            paths = _jsonl_paths(spec, opts)
        except ValueError as e:
            return ValueError, str(e)
        missing = [str(p) for p in paths if not p.exists()]
        return (FileNotFoundError, f"jsonl file(s) not found: {missing}") if missing else None
    local = spec.path and spec.path.startswith((".", "/", "~"))
    if local and not Path(spec.path).expanduser().exists():
        return FileNotFoundError, f"local dataset path {spec.path} does not exist"
    return None


def load_task(spec: TaskSpec, data_dir: Path | None = None) -> Task:
    """Load the task a spec names. Raises ValueError (bad spec or row) or FileNotFoundError."""
    problem = _problem(spec, data_dir)
    if problem:
        raise problem[0](f"task {spec.name!r}: {problem[1]}")
    opts = _options(spec)
    if spec.source == "synthetic":
        task = make_synthetic(opts.task or spec.name, spec.dev_limit or SYNTHETIC_DEFAULT_ROWS,
                              spec.test_limit or SYNTHETIC_DEFAULT_ROWS, opts.seed, spec.name)
        return task.model_copy(update={"max_tokens": spec.max_tokens}) if spec.max_tokens else task
    if spec.source == "moco":
        path = _moco_path(spec, data_dir)
        data = _read_json(path)
        kind = normalize_kind(spec.kind or str(data.get("task_type")))
        if kind is None:
            raise ValueError(f"{path}: task_type {data.get('task_type')!r} is not supported; give "
                             f"`kind` (one of {list(KINDS)}) in the task spec")
        dev, test, where = data["dev"], data["test"], str(path)
    elif spec.source == "jsonl":
        kind = normalize_kind(spec.kind or "")
        dev, test, where = _load_jsonl(spec, opts)
    else:
        kind = normalize_kind(spec.kind or "")
        dev, test, where = _load_hf(spec, opts)
    assert kind is not None  # _problem checked it
    dev, test = dev[:spec.dev_limit], test[:spec.test_limit]
    return build_task(spec.name, kind, dev, test, where, opts, spec.max_tokens)


def build_task(name: str, kind: str, dev_rows: list, test_rows: list, where: str,
               opts: TaskOptions | None = None, max_tokens: int | None = None) -> Task:
    """A Task from raw rows in MoCo's shape (see rows.py for the columns each kind reads)."""
    opts = opts or TaskOptions()
    dev = to_examples(kind, dev_rows, opts.columns, where, "dev")
    test = to_examples(kind, test_rows, opts.columns, where, "test")
    if kind == "multiple_choice":
        fns = (prompts.format_multiple_choice, metrics.extract_choice, metrics.choice_metric)
    elif kind == "exact_match":
        numeric = opts.numeric_answer
        if numeric is None:
            numeric = is_numeric_answer([e.reference for e in dev + test])
        fns = (prompts.format_boxed, partial(metrics.extract_exact, numeric=numeric),
               metrics.exact_metric)
    elif kind == "f1":
        fns = (prompts.format_boxed, metrics.extract_f1, metrics.f1_metric)
    else:
        limits = SandboxLimits(timeout_s=opts.code_timeout_s, memory_mb=opts.code_memory_mb)
        fns = (prompts.format_code, metrics.extract_code,
               partial(metrics.code_metric, limits=limits))
    return Task(name=name, kind=kind, dev=DevSplit(task=name, examples=dev),
                test=TestSplit(task=name, examples=test), format=fns[0], extract=fns[1],
                metric=fns[2], max_tokens=max_tokens or DEFAULT_MAX_TOKENS[kind])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(data, dict) and all(isinstance(data.get(s), list) for s in ("dev", "test"))):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: a MoCo task file is an object with `dev` and `test` lists; "
                         f"got {keys}")
    return data


def _jsonl_paths(spec: TaskSpec, opts: TaskOptions) -> list[Path]:
    if opts.dev_path or opts.test_path:
        if not (opts.dev_path and opts.test_path):
            raise ValueError("give both options.dev_path and options.test_path")
        return [Path(opts.dev_path), Path(opts.test_path)]
    if not spec.path:
        raise ValueError("a jsonl task needs `path` (a file with a "
                         f"{opts.split_column!r} column, or a folder with dev.jsonl and "
                         "test.jsonl)")
    p = Path(spec.path)
    return [p / "dev.jsonl", p / "test.jsonl"] if p.is_dir() else [p]


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _load_jsonl(spec: TaskSpec, opts: TaskOptions) -> tuple[list, list, str]:
    paths = _jsonl_paths(spec, opts)
    if len(paths) == 2:
        return _read_jsonl(paths[0]), _read_jsonl(paths[1]), f"{paths[0]} + {paths[1]}"
    dev, test, col = [], [], opts.split_column
    for i, row in enumerate(_read_jsonl(paths[0])):
        split = row.get(col) if isinstance(row, dict) else None
        if split is None:
            raise ValueError(f"{paths[0]} row {i}: missing key {col!r} (the split column); "
                             "values: dev or test (other values, e.g. train, are skipped)")
        if split in _DEV_SPLITS:
            dev.append(row)
        elif split == "test":
            test.append(row)
    return dev, test, str(paths[0])


def _load_hf(spec: TaskSpec, opts: TaskOptions) -> tuple[list, list, str]:
    import datasets  # heavy; only hub/local datasets need it

    name = spec.path or spec.name
    ds = datasets.load_dataset(name, **opts.load_kwargs)
    if not isinstance(ds, datasets.DatasetDict):
        raise ValueError(  # noqa: TRY004 (a bad option, named)
            f"load_dataset({name!r}) returned one split; drop `split` from "
            "options.load_kwargs and name the splits with dev_split / test_split")
    dev_split = opts.dev_split or next((s for s in _DEV_SPLITS if s in ds), None)
    for label, split in (("dev_split", dev_split), ("test_split", opts.test_split)):
        if split not in ds:
            raise ValueError(f"dataset {name!r} has no split {split!r} for options.{label}; "
                             f"splits: {list(ds)}")

    def rows(split: str, limit: int | None) -> list[dict]:
        d = ds[split]
        return d.select(range(min(limit, len(d)))).to_list() if limit else d.to_list()

    return rows(dev_split, spec.dev_limit), rows(opts.test_split, spec.test_limit), f"hf:{name}"
