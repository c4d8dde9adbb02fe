"""The student model a training starts from."""
from __future__ import annotations

import torch

from moco_ray.config.distill import DistillConfig


def build_model(cfg: DistillConfig, base_model_dir: str):
    """The student (float32 on CPU; DeepSpeed casts for bf16), wrapped in LoRA for 'lora'."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache while training
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model
