"""The zoo: tokenizer, tiny models, recipes, path resolution and checking."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moco_ray import models
from moco_ray.models import zoo


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MOCO_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_env(cache, monkeypatch):
    assert zoo.cache_dir() == cache
    assert zoo.zoo_dir() == cache / "zoo"
    monkeypatch.delenv("MOCO_RAY_CACHE")
    assert zoo.cache_dir() == Path.home() / ".cache" / "moco_ray"


def test_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    zoo.make_tokenizer(tmp_path / "tok", zoo.tiny_corpus(), vocab_size=600)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) <= 600
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tok("12+7=19 the answer").input_ids
    assert ids[0] == tok.bos_token_id
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[1:8] == ["1", "2", "+", "7", "=", "1", "9"]  # one token per digit
    assert tok.decode(ids, skip_special_tokens=True) == "12+7=19 the answer"
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<s><|user|>\nhi</s>\n<|assistant|>\n")
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s><|user|>\nhi</s>\n"
    with pytest.raises(ValueError, match="vocab_size=100"):
        zoo.make_tokenizer(tmp_path / "small", ["x"], vocab_size=100)


def test_tiny_llama_is_deterministic_per_seed(cache, tmp_path):
    from transformers import AutoConfig

    tok = zoo.tiny_tokenizer_dir()
    a = zoo.make_tiny_llama(tmp_path / "a", tok, seed=3)
    b = zoo.make_tiny_llama(tmp_path / "b", tok, seed=3)
    c = zoo.make_tiny_llama(tmp_path / "c", tok, seed=4)
    ta, tb, tc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert ta.keys() == tb.keys() == tc.keys()
    assert all((ta[k] == tb[k]).all() for k in ta)
    assert any((ta[k] != tc[k]).any() for k in ta)
    assert all(str(t.dtype) == "torch.float32" for t in ta.values())
    cfg = AutoConfig.from_pretrained(str(a))
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    assert (a / "tokenizer.json").is_file() and "quantization_config" not in cfg.to_dict()
    with pytest.raises(ValueError, match="head_dim of at least 32"):
        zoo.make_tiny_llama(tmp_path / "d", tok, seed=0, hidden_size=64, num_heads=4)


def test_resolve_builds_once_and_keeps_local_dirs(cache, tmp_path):
    path = Path(models.resolve_path("zoo:tiny-s5"))
    assert path == cache / "zoo" / "tiny-s5" and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_path("zoo:tiny-s5") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert models.resolve_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(KeyError, match="unknown zoo recipe 'nope'.*'tiny'"):
        models.resolve_path("zoo:nope")


def test_concurrent_resolves_build_one_model(cache):
    calls = []

    def build(out: Path):
        calls.append(out)
        zoo.make_tiny_llama(out, zoo.tiny_tokenizer_dir(), seed=9)

    zoo.register("test-concurrent", build)
    try:
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(
            models.resolve_path("zoo:test-concurrent"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        zoo._RECIPES.pop("test-concurrent")
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert sorted(p.name for p in (cache / "zoo").iterdir() if not p.name.endswith(".lock")) == [
        "_tokenizer-tiny", "test-concurrent"]  # no temp dirs left behind


def test_failed_build_leaves_nothing(cache):
    def broken(out: Path):
        (out / "half.txt").write_text("x")
        raise RuntimeError("boom")

    zoo.register("test-broken", broken)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            models.resolve_path("zoo:test-broken")
    finally:
        zoo._RECIPES.pop("test-broken")
    assert [p.name for p in (cache / "zoo").iterdir() if not p.name.endswith(".lock")] == []


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        zoo.register("tiny", lambda out: None)
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_family(r"tiny-s(\d+)", lambda m, out: None)
    assert "smollm2-135m-instruct" in zoo.recipe_names()


def test_check_path_builds_nothing(cache, tmp_path):
    assert models.check_path("zoo:tiny") is None
    assert models.check_path("zoo:tiny-s12") is None
    assert models.check_path("zoo:smollm2-135m-instruct") is None
    assert not cache.exists()  # nothing was built
    err = models.check_path("zoo:tiny-x")
    assert "unknown zoo recipe 'tiny-x'" in err and "smollm2-135m-instruct" in err
    assert "does not exist" in models.check_path(str(tmp_path / "missing"))
    assert "does not exist" in models.check_path("./no/such/model")
    assert "no config.json" in models.check_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert models.check_path(str(tmp_path)) is None
    assert models.check_path("Qwen/Qwen2.5-7B-Instruct") is None
