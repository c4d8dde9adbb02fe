"""What distill_all refuses on the driver, before any Ray Train run starts."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moco_ray.config import DistillConfig
from moco_ray.training import distill_all
from moco_ray.training.data import TokenizeFn


def test_duplicate_names_and_shared_out_dirs(tiny_models, memo_rows, tmp_path):
    base = tiny_models["student"]
    with pytest.raises(ValueError, match="duplicate model names"):
        distill_all([("a", base, memo_rows, str(tmp_path / "x")),
                     ("a", base, memo_rows, str(tmp_path / "y"))], DistillConfig())
    with pytest.raises(ValueError, match="share an out_dir"):
        distill_all([("a", base, memo_rows, str(tmp_path / "x")),
                     ("b", base, memo_rows, str(tmp_path / "x"))], DistillConfig())


def test_missing_model_bad_row_and_too_few_rows(tiny_models, memo_rows, tmp_path):
    base = tiny_models["student"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        distill_all([("a", str(tmp_path), memo_rows, str(tmp_path / "o"))], DistillConfig())
    with pytest.raises(ValueError, match="row 4: key 'messages'"):
        distill_all([("a", base, memo_rows + [{"messages": []}], str(tmp_path / "o"))],
                    DistillConfig())
    with pytest.raises(ValueError, match="cannot fill one optimizer step.*fix"):
        distill_all([("a", base, memo_rows, str(tmp_path / "o"))],
                    DistillConfig(batch_size=4, num_workers=2))


def test_ray_dataset_rows_name_their_id(tiny_models):
    fn = TokenizeFn(AutoTokenizer.from_pretrained(tiny_models["student"]), 64)
    with pytest.raises(ValueError, match="id='q7'.*no assistant turn"):
        fn({"id": "q7", "messages": [{"role": "user", "content": "hi"}]})


def test_op_cache_is_per_environment_and_drops_only_stale_build_locks(tmp_path, monkeypatch):
    import os
    import sys
    import time

    from moco_ray.training.trainer import STALE_OP_LOCK_S, op_cache_dir, prepare_op_cache

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert op_cache_dir() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dead, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (dead, live):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - STALE_OP_LOCK_S - 60
    os.utime(dead, (old, old))
    assert prepare_op_cache() == tmp_path
    assert not dead.exists() and live.exists()  # a build may still hold the fresh one
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_trainings_starting_together_import_without_racing():
    """Threads that each start a training's driver side at once: without the import lock, all
    but one fail with "cannot import name 'AutoTokenizer' from 'transformers'"."""
    code = textwrap.dedent("""
        import threading
        from moco_ray.training.launch import preload_imports
        errors = []
        def start():
            try:
                preload_imports()
                from transformers import AutoTokenizer
                from trl import DPOConfig
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=start) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("ERRORS", errors)
    """)
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERRORS []" in res.stdout, res.stdout[-3000:]
