"""How to build one engine (the pool's model specs make these; engines read them)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineSpec(BaseModel):
    """How to build one engine. `model` is a local directory or a hub name, passed through as is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(description="local model directory or Hugging Face hub name")
    kind: str = Field("vllm", description="engine kind: 'vllm' or 'hf'")
    dtype: str = Field("auto", description="'auto', 'float32', 'bfloat16' or 'float16'")
    max_model_len: int = Field(2048, ge=16, description="context length the engine reserves")
    seed: int = 0
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="vLLM on GPU only")
    enable_lora: bool = Field(False, description="serve LoRA adapters by name (vLLM)")
    max_lora_rank: int = 16
    engine_kwargs: dict = Field(default_factory=dict, description="extra engine arguments")
