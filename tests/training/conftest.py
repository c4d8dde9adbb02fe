"""Tiny models for the distillation tests: one small tokenizer (vocab 320, the tiny chat
template) and two random Llamas on it (student seed 0, teacher seed 1). Every size is spelled out
so the pinned losses do not move when the zoo's defaults do."""
from __future__ import annotations

import pytest
from distill_helpers import FACTS, chat

from moco_ray.models import zoo


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("distill_models")
    tok = zoo.make_tokenizer(root / "tok", zoo.tiny_corpus(), vocab_size=320)
    dims = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128,
            "max_position_embeddings": 256, "initializer_range": 0.1}
    return {"student": str(zoo.make_tiny_llama(root / "student", tok, seed=0, **dims)),
            "teacher": str(zoo.make_tiny_llama(root / "teacher", tok, seed=1, **dims))}


@pytest.fixture(scope="session")
def memo_rows() -> list[dict]:
    return [chat(q, a) for q, a in FACTS]
