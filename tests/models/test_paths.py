"""Hub names become local dirs on the driver (`resolve_path` -> `materialize`), read from a hub
cache this test builds in the layout huggingface_hub writes; offline, nothing is downloaded and a
missing model is an error naming it and how to pre-fill the cache."""
from __future__ import annotations

import json

import pytest

from moco_ray import models
from moco_ray.models import zoo

REV = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root, repo: str, source) -> None:
    """A hub cache holding `repo` at revision REV with `source`'s files (a real model dir)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            (snap / f.name).write_bytes(f.read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return hub


def test_a_hub_name_resolves_to_its_snapshot_in_the_cache(offline_hub):
    _hub_cache(offline_hub, "acme/tiny-chat", zoo.build("tiny"))
    path = models.resolve_path("acme/tiny-chat")
    assert path == str(offline_hub / "models--acme--tiny-chat" / "snapshots" / REV)
    assert json.loads((models.local_model_dir("acme/tiny-chat") / "config.json").read_text())
    # What engines and trainers open is the same directory.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).eos_token == "</s>"


def test_a_model_missing_offline_names_itself_and_the_fix(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"hub model 'acme/absent' is not in .*hub.*"
                                                r"hf download acme/absent"):
        models.resolve_path("acme/absent")


def test_hf_home_gives_the_cache_when_hub_cache_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert models.paths.hub_cache() == str(tmp_path / "hub")


def test_a_missing_local_dir_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        models.resolve_path(str(tmp_path / "nope"))
