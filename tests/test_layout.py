"""The import direction of docs/architecture.md, enforced: import-linter's contracts declared in
pyproject.toml (layers, and no cycle between sibling modules or packages at any depth)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    out = _lint_imports()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", out.stdout)
    for name in ("moco_ray layers: imports run one way",
                 "no import cycles between sibling modules or packages, at any depth"):
        assert f"{name} KEPT" in out.stdout


def test_the_contracts_catch_an_upward_import(tmp_path):
    """A lower layer importing a higher one breaks the layers contract (the check can fail)."""
    probe = ROOT / "moco_ray" / "config" / "_layout_probe.py"
    probe.write_text("from moco_ray.workflows import sweep  # noqa: F401\n")
    try:
        out = _lint_imports()
    finally:
        probe.unlink()
    assert out.returncode != 0
    assert "moco_ray.config is not allowed to import moco_ray.workflows" in out.stdout
