"""DistillConfig validation and the DeepSpeed config built from it."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from moco_ray.config.distill import DistillConfig, deepspeed_config


def test_every_field_has_a_description():
    missing = [n for n, f in DistillConfig.model_fields.items() if not f.description]
    assert missing == []


def test_all_problems_are_listed_with_field_and_fix():
    with pytest.raises(ValidationError) as err:
        DistillConfig(lr=0, lora_dropout=1.5, batch_size=0, method="full", output="adapter")
    msg = str(err.value)
    for part in ("lr=0", "lora_dropout=1.5", "batch_size=0", "output='adapter'", "fix:"):
        assert part in msg


def test_type_errors_name_the_field():
    with pytest.raises(ValidationError, match="zero_stage"):
        DistillConfig(zero_stage=1)
    with pytest.raises(ValidationError, match="nope"):
        DistillConfig(nope=1)  # unknown keys are refused, not ignored


def test_frozen():
    cfg = DistillConfig()
    with pytest.raises(ValidationError):
        cfg.lr = 1.0


def test_deepspeed_config_follows_the_settings():
    cfg = DistillConfig(zero_stage=3, batch_size=2, grad_accum=3, max_grad_norm=0.5)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    assert DistillConfig(num_workers=2, batch_size=2, grad_accum=3).rows_per_step == 12


def test_ingest_auto_reads_small_data_on_the_driver_and_streams_large_data():
    from moco_ray.config.distill import DRIVER_INGEST_MAX_ROWS

    auto = DistillConfig()
    assert auto.ingest == "auto"
    assert auto.ingest_on_driver(DRIVER_INGEST_MAX_ROWS)
    assert not auto.ingest_on_driver(DRIVER_INGEST_MAX_ROWS + 1)
    assert DistillConfig(ingest="driver").ingest_on_driver(10 ** 9)
    assert not DistillConfig(ingest="ray_data").ingest_on_driver(1)
    with pytest.raises(ValidationError, match="ingest"):
        DistillConfig(ingest="pandas")
