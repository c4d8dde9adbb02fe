"""Trainings beside a pool on GPUs default to GPUs and bf16 (NCCL follows use_gpu in
make_trainer); a config that sets either keeps its own. Pure logic."""
from __future__ import annotations

from moco_ray.config import ModelSpec, PoolConfig
from moco_ray.config.distill import DEFAULT_ADAPTER, DistillConfig, adapter_config, on_gpu_pool
from moco_ray.training.service import TrainerService


def test_pool_on_gpus_is_any_model_with_gpus():
    cpu = ModelSpec(name="a", path="zoo:tiny")
    assert not PoolConfig(models=[cpu]).on_gpus
    scratch = ModelSpec(name="s", path="zoo:tiny", num_gpus=0.5, role="scratch")
    assert PoolConfig(models=[cpu, scratch]).on_gpus


def test_on_gpu_pool_fills_only_what_is_unset():
    assert not DEFAULT_ADAPTER.use_gpu
    gpu = on_gpu_pool(DEFAULT_ADAPTER)
    assert gpu.use_gpu and gpu.bf16 and gpu.lr == DEFAULT_ADAPTER.lr
    # adapter_config keeps the fields neither it nor the caller set unset
    tuned = on_gpu_pool(adapter_config(max_steps=7))
    assert (tuned.use_gpu, tuned.bf16, tuned.max_steps) == (True, True, 7)
    mine = on_gpu_pool(adapter_config(use_gpu=False))
    assert (mine.use_gpu, mine.bf16) == (False, True)
    assert on_gpu_pool(DistillConfig(bf16=False)).bf16 is False
    assert on_gpu_pool(gpu) == gpu


def test_trainer_service_trains_on_gpus_only_beside_a_gpu_pool():
    cfg = adapter_config(max_steps=3)
    assert TrainerService(on_gpu=True).placed(cfg).use_gpu
    assert TrainerService().placed(cfg) == cfg
