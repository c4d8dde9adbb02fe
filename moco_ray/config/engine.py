"""How to build one engine (the pool's model specs make these; engines read them)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineSpec(BaseModel):
    """How to build one engine. `model` is a local directory or a hub name, passed through as is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(description="local model directory or Hugging Face hub name")
    kind: str = Field("vllm", description="engine kind: 'vllm' or 'hf'")
    dtype: str = Field("auto", description="'auto', 'float32', 'bfloat16' or 'float16'")
    max_model_len: int = Field(2048, ge=16, description="context length the engine reserves")
    seed: int = 0
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="vLLM on GPU only: share of each GPU's memory the "
        "engine takes for weights, activations and KV cache")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs each layer is split over")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: stages the layers are split "
                                        "into, one GPU group each")
    distributed_executor_backend: Literal["ray", "mp"] | None = Field(
        None, description="vLLM: how tensor/pipeline workers run; 'ray': as Ray actors in the "
        "caller's placement group (the pool's choice); None: vLLM's default")
    enable_lora: bool = Field(False, description="serve LoRA adapters by name (vLLM)")
    max_lora_rank: int = 16
    max_loras: int = Field(1, ge=1, description="vLLM: LoRA adapters one batch may mix")
    engine_kwargs: dict = Field(default_factory=dict, description="extra engine arguments")
