"""What distill_all refuses on the driver, before any Ray Train run starts."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from moco_ray.distill import DistillConfig, distill_all
from moco_ray.distill.data import TokenizeFn


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
