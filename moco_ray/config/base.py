"""What every config schema shares: the frozen base model and the one error type."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
