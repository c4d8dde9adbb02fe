"""Model sizes from config.json: the parameter formula against transformers' own models (built
on the meta device, no weights), LoRA and KV-cache sizes, and where a config is found."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moco_ray.models import sizing

CONFIGS = {
    "llama_untied": {"model_type": "llama", "hidden_size": 96, "num_hidden_layers": 3,
                     "intermediate_size": 200, "vocab_size": 500, "num_attention_heads": 6,
                     "num_key_value_heads": 2, "tie_word_embeddings": False},
    "llama_tied": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                   "intermediate_size": 128, "vocab_size": 320, "num_attention_heads": 4,
                   "tie_word_embeddings": True},
    # Qwen2's q/k/v biases are the formula's one omission
    "qwen2": {"model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 2,
              "intermediate_size": 256, "vocab_size": 400, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": False},
    # head_dim apart from hidden / heads
    "gemma": {"model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 2,
              "intermediate_size": 96, "vocab_size": 300, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 48},
}


def _meta_model(cfg: dict):
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_matches_transformers(name):
    model = _meta_model(CONFIGS[name])
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".bias"))
    assert sizing.param_count(CONFIGS[name]) == weights


def test_lora_params_match_peft():
    from peft import LoraConfig, get_peft_model

    cfg = CONFIGS["llama_untied"]
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = get_peft_model(_meta_model(cfg), LoraConfig(r=4, target_modules=targets))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert sizing.lora_params(cfg, 4, targets) == trainable


def test_kv_bytes_and_dtypes():
    cfg = CONFIGS["llama_untied"]  # 3 layers, 2 KV heads of 16
    assert sizing.kv_bytes_per_token(cfg, 2) == 2 * 3 * 2 * 16 * 2
    assert sizing.dtype_bytes("float32") == 4 and sizing.dtype_bytes("bfloat16") == 2
    assert sizing.dtype_bytes("auto", {"torch_dtype": "float32"}) == 4
    assert sizing.dtype_bytes("auto", None) == 2
    with pytest.raises(ValueError, match="'int3' is not one of"):
        sizing.dtype_bytes("int3")
    moe = {**cfg, "model_type": "mixtral", "num_local_experts": 8}
    assert sizing.param_count(moe) is None and sizing.kv_bytes_per_token(moe, 2) is None


def test_local_config_reads_dirs_zoo_and_hub_cache(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIGS["qwen2"]))
    assert sizing.local_config(str(model)) == CONFIGS["qwen2"]
    assert sizing.local_config(str(tmp_path / "missing")) is None
    # a zoo model is read once built, never built here
    monkeypatch.setenv("MOCO_RAY_CACHE", str(tmp_path / "cache"))
    assert sizing.local_config("zoo:tiny") is None
    (tmp_path / "cache" / "zoo" / "tiny").mkdir(parents=True)
    (tmp_path / "cache" / "zoo" / "tiny" / "config.json").write_text(json.dumps({"a": 1}))
    assert sizing.local_config("zoo:tiny") == {"a": 1}
    # a hub name: the snapshot in the hub cache (the layout huggingface_hub writes)
    hub = tmp_path / "hub"
    repo = hub / "models--org--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(CONFIGS["gemma"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert sizing.local_config("org/m") == CONFIGS["gemma"]
    assert sizing.local_config("org/absent") is None
