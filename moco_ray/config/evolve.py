"""An evolution run: the pool, tasks, the system strategy, and how each generation distills."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from moco_ray.config.distill import DistillConfig, on_gpu_pool
from moco_ray.config.pool import PoolConfig
from moco_ray.config.run import STORAGE_HELP, HasStorage, JobSpec, RunConfig
from moco_ray.config.task import TaskSpec


class EvolveConfig(HasStorage):
    run_name: str = "evolve"
    storage: str = Field("runs", min_length=1, description=STORAGE_HELP)
    seed: int = 0
    concurrency: int = Field(16, ge=1)
    generations: int = Field(2, ge=1, description="distillation rounds after generation 0")
    recipe: Literal["supervised_kd", "multi_student_kd"] = Field(
        "supervised_kd", description="supervised_kd: every model learns the system's outputs; "
        "multi_student_kd: plus half its own and half the best single model's outputs (dev)")
    keep: Literal["all", "correct", "agreement"] = Field(
        "all", description="which dev records become training rows. all (the reference's "
        "moco_distill: every output of the collaboration is distilled); correct: only rows "
        "scoring 1 on dev, so on deterministic tasks (exact match, multiple choice) every kept "
        "output states the gold answer and this is gold-label SFT rather than distillation of "
        "the collaboration; agreement: rows whose extracted answer a strict majority of the "
        "single models also gave on that example")
    pool: PoolConfig
    tasks: list[TaskSpec] = Field(min_length=1)
    system: JobSpec = Field(description="the collaboration strategy whose outputs are distilled")
    distill: DistillConfig = Field(
        default_factory=DistillConfig, validate_default=True, description="how every model "
        "distills; beside a pool on GPUs use_gpu and bf16 default to true")
    overlap: bool = Field(
        True, description="run eval_g (test) and collab_g+1 (dev) together on the pool: both "
        "use generation g's weights, so their jobs share the engines' batches; false runs every "
        "stage alone (cleaner per-stage timings)")

    @field_validator("distill")
    @classmethod
    def _gpu_defaults(cls, v: DistillConfig, info: ValidationInfo) -> DistillConfig:
        # The trainers run beside the pool: on a GPU pool they train on GPUs too, in bf16.
        pool = info.data.get("pool")
        return on_gpu_pool(v) if pool is not None and pool.on_gpus else v

    def run_config(self) -> RunConfig:
        """The sweep view of this config (the same pool, tasks and the system job)."""
        return RunConfig(run_name=self.run_name, storage=self.storage, seed=self.seed,
                         concurrency=self.concurrency, pool=self.pool, tasks=self.tasks,
                         jobs=[self.system])
