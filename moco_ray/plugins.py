"""Extension points named by import path: 'package.module:Name' (a strategy, an engine class, a
weight-sync backend), so a Ray actor or replica imports what a config names instead of relying on
registrations the driver happened to run."""
from __future__ import annotations

from importlib import import_module


def load_object(ref: str):
    """The object 'package.module:Name' names (imports the module)."""
    module, _, name = ref.partition(":")
    return getattr(import_module(module), name)
