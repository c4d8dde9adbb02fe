"""The one real pretrained model: SmolLM2-135M-Instruct converted from its GGUF by the zoo.

Runs in the default suite: conversion plus a short generation take about 40 s on 2 busy cores.
"""
from __future__ import annotations

import json
from pathlib import Path

from moco_ray import models
from moco_ray.config import EngineSpec
from moco_ray.engines.hf import HFEngine
from moco_ray.records import SamplingParams


def test_smollm2_converts_and_answers(zoo_cache, run):
    path = Path(models.resolve_path("zoo:smollm2-135m-instruct"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM would try to honour it
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert list(path.glob("*.safetensors"))

    eng = HFEngine(EngineSpec(model=str(path), kind="hf", dtype="float32", max_model_len=1024))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert "<|im_start|>assistant\n" in eng.render(question)  # its own chat template
    g = run(eng.generate([question], SamplingParams(max_tokens=24)))[0]
    assert "Paris" in g.text
    assert g.finish_reason == "stop"  # it ends its answer with <|im_end|>
    paris, berlin = run(eng.score(question, ["The capital of France is Paris.",
                                             "The capital of France is Berlin."]))
    assert paris.sum_logprob > berlin.sum_logprob + 3
