"""Tasks: examples, splits and metrics.

Dev and test are different types on purpose: `DevSplit` feeds tuning, training and model choice;
`TestSplit` only evaluation. Neither converts into the other, and every API that tunes or trains
(`Strategy.fit`, distillation data builders) checks for `DevSplit` at run time, so test rows cannot
reach tuning by accident.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moco_ray.records import Prompt

TaskKind = Literal["multiple_choice", "exact_match", "f1", "code", "synthetic"]


class Example(BaseModel):
    """One task row, already in the project's shape. `reference` is what the metric compares to."""

    model_config = ConfigDict(frozen=True)
    id: str
    question: str
    reference: Any
    choices: dict[str, str] | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class _Split(BaseModel):
    model_config = ConfigDict(frozen=True)
    task: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):  # type: ignore[override]
        return iter(self.examples)

    def head(self, n: int | None):
        return type(self)(task=self.task, examples=self.examples[:n] if n else self.examples)


class DevSplit(_Split):
    """Rows that may feed tuning, training and model selection."""

    split: Literal["dev"] = "dev"


class TestSplit(_Split):
    """Rows for evaluation only. Refused by every tuning and training entry point."""

    __test__ = False  # not a pytest test class

    split: Literal["test"] = "test"


def require_dev(split: Any, where: str) -> DevSplit:
    """Raise unless `split` is dev data: the guard every tuning/training path calls."""
    if not isinstance(split, DevSplit):
        got = getattr(split, "split", type(split).__name__)
        raise TypeError(f"{where} takes dev data only (DevSplit); got {got!r}. "
                        "Test rows are for evaluation and never reach tuning or training.")
    return split


class Task(BaseModel):
    """A named task: its splits, how to turn a row into a prompt, and how to score an answer."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    kind: TaskKind
    dev: DevSplit
    test: TestSplit
    # format(example) -> prompt; extract(output) -> answer string; metric(answer, example) -> [0, 1]
    format: Callable[[Example], Prompt]
    extract: Callable[[str, Example], str]
    metric: Callable[[str, Example], float]
    max_tokens: int = 64

    def prompt(self, example: Example) -> Prompt:
        return self.format(example)

    def score(self, output: str, example: Example) -> float:
        return float(self.metric(self.extract(output, example), example))

    def split(self, which: Literal["dev", "test"]) -> DevSplit | TestSplit:
        return self.dev if which == "dev" else self.test
