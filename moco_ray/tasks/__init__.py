"""Tasks: MoCo task files, JSONL, hub datasets and synthetic tasks, with their metrics.

`load_task(spec)` is the entry point; `known_task(spec)` is the cheap check config validation uses.
Code answers run in `sandbox.run_python`: bubblewrap namespaces (no network, read-only filesystem
but the program's dir), seccomp, resource limits and audit hooks; the verdict comes from a guard
thread the program cannot reach (see sandbox.py).
"""
from moco_ray.tasks.base import DevSplit, Example, Task, TestSplit, require_dev
from moco_ray.tasks.loaders import (
                                    DEFAULT_MAX_TOKENS,
                                    TaskOptions,
                                    build_task,
                                    known_task,
                                    load_task,
                                    moco_data_dir,
)
from moco_ray.tasks.sandbox import SandboxLimits, SandboxResult, run_many, run_python
from moco_ray.tasks.synthetic import (
                                    SYNTHETIC_TASKS,
                                    make_synthetic,
                                    synthetic_corpus,
                                    synthetic_pairs,
)

__all__ = [
    "DEFAULT_MAX_TOKENS", "SYNTHETIC_TASKS", "DevSplit", "Example", "SandboxLimits",
    "SandboxResult", "Task", "TaskOptions", "TestSplit", "build_task", "known_task", "load_task",
    "make_synthetic", "moco_data_dir", "require_dev", "run_many", "run_python", "synthetic_corpus",
    "synthetic_pairs",
]
