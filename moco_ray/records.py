"""Typed records for every hand-off: prompts, sampling, generations, turns, cost and job records.

The Parquet schema of the outputs is derived from `Record`'s fields (`outputs.arrow_schema`), so a
field added here shows up in every materialized table; one whose annotation has no Arrow mapping
fails at import of outputs.py.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# A prompt is raw text or a list of chat messages ({"role": ..., "content": ...}); engines apply
# the model's chat template to the latter.
ChatMessage = dict[str, str]
Prompt = str | list[ChatMessage]


class SamplingParams(BaseModel):
    """What a strategy asks of an engine. Temperature reaches the engine as given (the reference
    dropped it on the way)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_tokens: int = Field(64, ge=1, description="new tokens at most")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, description="per-request seed for sampling")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included)")
    logprobs: int | None = Field(None, ge=0, le=20, description="top-k logprobs per new token")


class TokenLogprobs(BaseModel):
    """One generated token: its id, its logprob, and the top-k alternatives (id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = Field(default_factory=dict)


class Generation(BaseModel):
    """One completion from one model."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort"] = "stop"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    model: str = ""
    version: int = 0
    engine_seconds: float = 0.0

    @property
    def mean_logprob(self) -> float | None:
        """Mean logprob of the generated tokens (a confidence signal), None without logprobs."""
        if not self.logprobs:
            return None
        return sum(t.logprob for t in self.logprobs) / len(self.logprobs)


class Score(BaseModel):
    """Log-likelihood of one continuation given a prompt."""

    sum_logprob: float
    mean_logprob: float
    num_tokens: int


class Cost(BaseModel):
    """Accounting for one model within one job."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0

    def add(self, other: Cost) -> Cost:
        return Cost(
            calls=self.calls + other.calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            engine_seconds=self.engine_seconds + other.engine_seconds,
        )


class Turn(BaseModel):
    """One step of a collaboration trace: which model did what, with which input and output."""

    model: str
    step: str
    prompt: str
    output: str
    version: int = 0
    meta: dict[str, Any] = Field(default_factory=dict)


class Record(BaseModel):
    """The result of one strategy on one example: final answer, score, full trace and cost."""

    run: str = ""
    generation: int = 0
    job: str = ""
    strategy: str
    task: str
    split: Literal["dev", "test"]
    example_id: str
    prompt: str
    output: str
    # The prompt as chat messages (what distillation trains on); raw-text prompts become one
    # user message.
    chat: list[ChatMessage] = Field(default_factory=list)
    reference: str = ""
    score: float | None = None
    trace: list[Turn] = Field(default_factory=list)
    model_versions: dict[str, int] = Field(default_factory=dict)
    cost: dict[str, Cost] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
