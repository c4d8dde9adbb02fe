"""An evolution run: the pool, tasks, the system strategy, and how each generation distills."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from moco_ray.config.base import Frozen
from moco_ray.config.distill import DistillConfig
from moco_ray.config.pool import PoolConfig
from moco_ray.config.run import JobSpec, RunConfig
from moco_ray.config.task import TaskSpec


class EvolveConfig(Frozen):
    run_name: str = "evolve"
    output_dir: str = "runs"
    seed: int = 0
    concurrency: int = Field(16, ge=1)
    generations: int = Field(2, ge=1, description="distillation rounds after generation 0")
    recipe: Literal["supervised_kd", "multi_student_kd"] = Field(
        "supervised_kd", description="supervised_kd: every model learns the system's outputs; "
        "multi_student_kd: plus half its own and half the best single model's outputs (dev)")
    keep: Literal["all", "correct", "agreement"] = Field(
        "correct", description="which dev records become training rows: all; correct "
        "(score == 1 on dev); agreement (the system's answer matches a majority of the models)")
    pool: PoolConfig
    tasks: list[TaskSpec] = Field(min_length=1)
    system: JobSpec = Field(description="the collaboration strategy whose outputs are distilled")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    overlap: bool = Field(
        True, description="run eval_g (test) and collab_g+1 (dev) together on the pool: both "
        "use generation g's weights, so their jobs share the engines' batches; false runs every "
        "stage alone (cleaner per-stage timings)")

    def run_config(self) -> RunConfig:
        """The sweep view of this config (the same pool, tasks and the system job)."""
        return RunConfig(run_name=self.run_name, output_dir=self.output_dir, seed=self.seed,
                         concurrency=self.concurrency, pool=self.pool, tasks=self.tasks,
                         jobs=[self.system])
