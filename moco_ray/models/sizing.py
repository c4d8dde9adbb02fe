"""Model sizes from a config.json, without loading any weights: parameter count, bytes per
parameter, KV-cache bytes per token. For planning GPU memory (`moco-ray plan`) and for placing
a logit group's members on its GPUs.

Parameter count of a dense decoder with a gated MLP, from these config.json keys:

    h = hidden_size, L = num_hidden_layers, I = intermediate_size, V = vocab_size,
    a = num_attention_heads, k = num_key_value_heads (default a), d = head_dim (default h / a)
    per layer   = h·a·d + 2·h·k·d + a·d·h      (q, k, v, o projections)
                + 3·h·I                        (gate, up, down)
                + 2·h                          (two norms)
    total       = L·(per layer) + V·h (embeddings) + h (final norm)
                  + V·h (output head, unless tie_word_embeddings)

A key the config.json leaves out takes the default of transformers' config class for its
model_type. Biases (Qwen2's q/k/v) and per-head norms (Qwen3) are left out: under 0.1% of the
total (the tests compare the formula with transformers' models). Only the families below have
that shape; for any other `model_type` (MoE, non-gated MLPs) the count is unknown and a pool
model gives its size as `params_b`.
"""
from __future__ import annotations

import json
from pathlib import Path

from moco_ray.models.paths import hub_cache
from moco_ray.models.zoo.registry import zoo_dir

DENSE_GATED = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite",
                         "olmo", "olmo2", "phi3", "smollm3"})
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
# Linear layers of one decoder layer: (input dim, output dim) in the formula's letters.
_LINEAR = {"q_proj": ("h", "ad"), "k_proj": ("h", "kd"), "v_proj": ("h", "kd"),
           "o_proj": ("ad", "h"), "gate_proj": ("h", "I"), "up_proj": ("h", "I"),
           "down_proj": ("I", "h")}


def local_config(path: str) -> dict | None:
    """The config.json of a pool model path if it is on this machine, else None. Reads only:
    a zoo model not yet built, or a hub model not in the hub cache, gives None (nothing is
    built or downloaded)."""
    if path.startswith("zoo:"):
        file = zoo_dir() / path[len("zoo:"):] / "config.json"
    elif Path(path).expanduser().is_dir() or path.startswith(("/", ".", "~")):
        file = Path(path).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache  # slow import; hub names only

        found = try_to_load_from_cache(path, "config.json", cache_dir=hub_cache())
        file = Path(found) if isinstance(found, str) else None
    if file is None or not file.is_file():
        return None
    return json.loads(file.read_text())


def _with_defaults(cfg: dict) -> dict:
    """`cfg` with its model class's defaults filled in (transformers' config class: a key left
    out of a config.json, tie_word_embeddings say, means that class's default)."""
    from transformers import AutoConfig  # slow import; only for sizes

    try:
        return AutoConfig.for_model(**cfg).to_dict()
    except (ValueError, KeyError, TypeError):
        return cfg


def _dims(cfg: dict) -> dict[str, int] | None:
    if cfg.get("model_type") not in DENSE_GATED:
        return None
    cfg = _with_defaults(cfg)
    try:
        h, a = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        d = int(cfg.get("head_dim") or h // a)
        k = int(cfg.get("num_key_value_heads") or a)
        return {"h": h, "L": int(cfg["num_hidden_layers"]), "I": int(cfg["intermediate_size"]),
                "V": int(cfg["vocab_size"]), "ad": a * d, "kd": k * d}
    except (KeyError, TypeError, ValueError):
        return None


def param_count(cfg: dict) -> int | None:
    """Parameters by the module docstring's formula; None for a config it does not cover."""
    x = _dims(cfg)
    if x is None:
        return None
    h, n_layers, vocab = x["h"], x["L"], x["V"]
    layer = sum(x[i] * x[o] for i, o in _LINEAR.values()) + 2 * h
    head = 0 if _with_defaults(cfg).get("tie_word_embeddings") else vocab * h
    return n_layers * layer + vocab * h + h + head


def lora_params(cfg: dict, rank: int, targets: list[str] | str) -> int | None:
    """Trainable LoRA parameters: rank·(in + out) for each targeted linear layer of every
    decoder layer ('all-linear': all seven of the formula's projections)."""
    x = _dims(cfg)
    if x is None:
        return None
    names = list(_LINEAR) if targets == "all-linear" else [t for t in targets if t in _LINEAR]
    return x["L"] * sum(rank * (x[_LINEAR[n][0]] + x[_LINEAR[n][1]]) for n in names)


def kv_bytes_per_token(cfg: dict, dtype_bytes: int) -> int | None:
    """KV-cache bytes one token takes in every layer: 2 (K and V)·L·k·d·bytes."""
    x = _dims(cfg)
    return None if x is None else 2 * x["L"] * x["kd"] * dtype_bytes


def shape(cfg: dict) -> dict[str, int] | None:
    """hidden size `h`, layers `L`, vocabulary `V` (for activation estimates), or None."""
    x = _dims(cfg)
    return None if x is None else {"h": x["h"], "L": x["L"], "V": x["V"]}


def dtype_bytes(dtype: str, cfg: dict | None = None) -> int:
    """Bytes per parameter of a dtype name; 'auto' takes the config's (`torch_dtype`, or
    `dtype` in newer transformers), else 2 (bf16/fp16, what checkpoints mostly hold)."""
    if dtype == "auto":
        dtype = str((cfg or {}).get("torch_dtype") or (cfg or {}).get("dtype") or "bfloat16")
    try:
        return DTYPE_BYTES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)} or 'auto'") \
            from None
