"""Zoo recipes that train with moco_ray's own trainer: SmolLM2 copies LoRA-tuned on one real
MoCo task each (`zoo:smollm2-ft-<task>`).

Declared under the `moco_ray.zoo` entry point group (pyproject.toml), so the zoo imports this
module on its first lookup without depending on the training layer.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from moco_ray.config import DistillConfig, TaskSpec
from moco_ray.models import zoo
from moco_ray.tasks.loaders import load_task
from moco_ray.training.launch import distill_local

SMOL_FT_ROWS = 64  # dev rows of the task the copy is tuned on
SMOL_FT_STEPS = 24


def _target(task, example) -> str:
    """The answer a tuned copy learns, in the form the task's metric reads."""
    if task.kind == "multiple_choice":
        return f"The answer is {example.reference}."
    if task.kind in ("exact_match", "f1"):
        ref = example.reference[0] if isinstance(example.reference, list) else example.reference
        return f"\\boxed{{{ref}}}"
    return str(example.reference)


def smollm2_specialist(out_dir: Path, task_name: str, rows: int = SMOL_FT_ROWS,
                       steps: int = SMOL_FT_STEPS) -> Path:
    """SmolLM2-135M-Instruct with a LoRA (r=16, merged) tuned on the first `rows` DEV rows of the
    MoCo task `task_name` (read where `tasks.loaders.moco_data_dir` says): a copy that leans to one
    task's questions and answer form. Trained with moco_ray's own DeepSpeed loop on one rank."""
    task = load_task(TaskSpec(name=task_name, source="moco", dev_limit=rows, test_limit=1))
    data = [{"messages": [*task.prompt(ex), {"role": "assistant", "content": _target(task, ex)}]}
            for ex in task.dev]  # dev only: test rows never train a model
    base = zoo.build("smollm2-135m-instruct")
    cfg = DistillConfig(method="lora", output="merged", lora_r=16, lora_alpha=32.0, lr=5e-4,
                        batch_size=4, max_steps=steps, max_seq_len=512, zero_stage=0,
                        report_every=steps, seed=0)
    with tempfile.TemporaryDirectory(prefix="smolft_") as tmp:
        distill_local(f"smollm2-ft-{task_name}", str(base), data, f"{tmp}/ckpt", cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in Path(f"{tmp}/ckpt").iterdir():
            shutil.move(str(f), out_dir / f.name)
    return out_dir


zoo.register_family(r"smollm2-ft-([a-z0-9_]+)",
                    lambda m, out: smollm2_specialist(out, m.group(1)))
