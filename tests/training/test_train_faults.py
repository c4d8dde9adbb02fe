"""A Ray Train worker SIGKILLed mid-distillation: the run restarts (FailureConfig) from its last
resume checkpoint and ends where an unbroken run ends."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from moco_ray.config import DistillConfig
from moco_ray.training import distill_all
from moco_ray.training.trainer import RESUME_STATE


def _train_workers() -> set[int]:
    """pids of the live Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker"):
            out.add(p.info["pid"])
    return out


def _kill_after_second_resume_checkpoint(storage: Path, before: set[int], killed: list,
                                        timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # The second one: a report returns once Ray Train's controller has taken it, so by
        # the time the second is written the first is registered (a kill right after the first
        # upload can beat its registration, and the restart would rightly start from step 0).
        if len(list(storage.rglob(RESUME_STATE))) >= 2:
            ours = sorted(_train_workers() - before)
            if ours:
                os.kill(ours[-1], signal.SIGKILL)
                killed.append(ours[-1])
                return
        time.sleep(0.05)


def test_worker_killed_mid_distillation_resumes(ray_session, tiny_models, memo_rows, tmp_path):
    base = tiny_models["student"]
    # Dropout on: the resumed run matches the unbroken one only if each rank's RNG is restored.
    cfg = DistillConfig(method="lora", zero_stage=2, num_workers=2, batch_size=2, lr=2e-2,
                        lora_dropout=0.1, max_steps=24, checkpoint_every=4, report_every=4,
                        max_failures=1)
    clean = distill_all([("clean", base, memo_rows, str(tmp_path / "clean"))],
                        cfg.model_copy(update={"storage_path": str(tmp_path / "s_clean")}))
    clean = clean["clean"]
    assert clean.resumed_from is None and len(clean.losses) == 24

    storage = tmp_path / "s_killed"
    killed: list[int] = []
    before = _train_workers()
    killer = threading.Thread(target=_kill_after_second_resume_checkpoint,
                              args=(storage, before, killed), daemon=True)
    killer.start()
    info = distill_all([("killed", base, memo_rows, str(tmp_path / "killed"))],
                       cfg.model_copy(update={"storage_path": str(storage)}))["killed"]
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was killed: the run ended before its second checkpoint"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == "zombie"
    # It went on from a checkpoint (a multiple of 4 steps, before the end), not from step 0.
    assert info.resumed_from is not None and info.resumed_from % 4 == 0
    assert 4 <= info.resumed_from < 24
    assert len(info.losses) == 24
    # Same batches, same dropout draws, same optimizer state: the same losses as unbroken.
    assert info.losses == pytest.approx(clean.losses, rel=1e-4, abs=1e-5)
    assert not (Path(info.path) / "moco_run_progress.json").exists()


def test_resume_settings_are_checked():
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        DistillConfig(checkpoint_every=0)
    with pytest.raises(ValueError, match="max_failures=-1"):
        DistillConfig(max_failures=-1)
