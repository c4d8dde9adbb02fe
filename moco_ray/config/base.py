"""What every config schema shares: the frozen base model and the one error type."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A config with problems; the message lists each one with the key it sits under."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


class Frozen(BaseModel):
    """Frozen, and unknown keys are errors (a typo never passes silently)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def fmt_loc(loc: tuple) -> str:
    """A pydantic error location as the dotted key a user writes in YAML."""
    return ".".join(str(p) for p in loc)


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    if {"CPU", "GPU"} & set(resources):
        raise ValueError("CPU and GPU have their own fields (num_cpus / num_gpus, "
                         "cpus_per_worker / use_gpu); resources names custom Ray resources only")
    return resources


# Custom Ray resources (the names nodes were started with, e.g. `ray start --resources
# '{"node_a": 1}'`) a replica or worker reserves; Ray places it only on a node that has them.
CustomResources = Annotated[dict[str, Annotated[float, Field(ge=0)]],
                            AfterValidator(_custom_only)]
