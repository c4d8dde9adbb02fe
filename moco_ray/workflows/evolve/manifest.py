"""The run directory's manifest: which stages are done, with what they produced."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class Manifest:
    """Which stages are done, with what they produced; written atomically after each stage."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("state") == "done"

    def output(self, stage: str) -> dict:
        return self.data["stages"][stage]["output"]

    def mark(self, stage: str, output: dict, seconds: float) -> None:
        self.data["stages"][stage] = {"state": "done", "output": output, "seconds": seconds,
                                      "finished": time.time()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
