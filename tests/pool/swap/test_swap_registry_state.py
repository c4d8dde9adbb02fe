"""The swap registry's persisted state: a registry started on it continues the models' history,
live versions and numbering; an unreadable state is refused with the file named."""
from __future__ import annotations

import pytest

from moco_ray.pool.swap.hotswap import SwapError, SwapRegistry

MODELS = {"a": {"path": "/w/a0", "apps": ["p-a"]}, "b": {"path": "/w/b0", "apps": ["p-b"]}}


def test_a_restarted_registry_continues_versions_and_numbering(tmp_path):
    state = tmp_path / "reg.json"
    reg = SwapRegistry(MODELS, str(state))
    assert reg.propose("a", "/w/a1").version == 1
    assert reg.propose("a", "/w/a2").version == 2
    reg.mark_failed("a", 2, "replica refused")
    reg.activate("a", 1)
    assert reg.group_version("g", {"a": 1, "b": 0}) == 0

    again = SwapRegistry({**MODELS, "c": {"path": "/w/c0", "apps": ["p-c"]}}, str(state))
    assert again.versions() == {"a": {"version": 1, "path": "/w/a1"},
                                "b": {"version": 0, "path": "/w/b0"},
                                "c": {"version": 0, "path": "/w/c0"}}
    assert [v.failed for v in again.history("a")] == [None, None, "replica refused"]
    assert again.propose("a", "/w/a3").version == 3  # numbering goes on after the failed one
    assert again.group_version("g", {"a": 1, "b": 0}) == 0
    assert again.group_version("g", {"a": 3, "b": 0}) == 1
    # Without a state file nothing carries over.
    assert SwapRegistry(MODELS).versions()["a"] == {"version": 0, "path": "/w/a0"}


def test_an_unreadable_state_is_refused(tmp_path):
    state = tmp_path / "reg.json"
    state.write_text("{not json")
    with pytest.raises(SwapError, match="reg.json"):
        SwapRegistry(MODELS, str(state))
