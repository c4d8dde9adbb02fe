"""`moco-ray plan`: placement arithmetic on configs (pure logic, no Ray): the shipped GPU configs
fit the cluster their header names, configs that cannot fit are refused with the reason, and the
CLI prints the table."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moco_ray.cli import app
from moco_ray.config import DistillConfig, ModelSpec
from moco_ray.workflows.load import parse_config, parse_evolve
from moco_ray.workflows.plan import GIB, Cluster, model_size, plan_config, trainer_bytes

GPU_CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "gpu").glob("*.yaml"))
# Qwen2.5-7B's config.json (the keys the formula reads)
QWEN7B = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
          "intermediate_size": 18944, "vocab_size": 152064, "num_attention_heads": 28,
          "num_key_value_heads": 4, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def header_cluster(path: Path) -> str:
    m = re.search(r"^# cluster: (\S+)$", path.read_text(), re.MULTILINE)
    assert m, f"{path.name} names no '# cluster: NxGxMEM' in its header comment"
    return m[1]


@pytest.fixture(scope="module")
def qwen7b_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("qwen7b")
    (d / "config.json").write_text(json.dumps(QWEN7B))
    return str(d)


def run_cfg(models: list[dict], groups: list[dict] = (), **top):
    return parse_config({"pool": {"models": models, "logit_groups": list(groups)},
                         "tasks": [{"name": "max", "source": "synthetic"}],
                         "jobs": [{"strategy": "single", "params": {"model": models[0]["name"]}}],
                         **top})


def test_every_gpu_config_names_a_cluster_it_fits():
    assert GPU_CONFIGS
    for path in GPU_CONFIGS:
        raw = yaml.safe_load(path.read_text())
        plan = plan_config(parse_config(raw, str(path)), Cluster.parse(header_cluster(path)))
        assert plan.fits, (path.name, plan.problems)
        placed = [it for it in plan.items if it.bundles]
        assert placed and all(it.where for it in placed)


def test_three_7b_models_in_one_group_on_one_40gb_gpu_are_refused():
    raw = yaml.safe_load((Path(GPU_CONFIGS[0]).parent / "qwen7b_pool.yaml").read_text())
    assert raw["pool"]["logit_groups"][0]["num_gpus"] == 3  # the shipped one: a GPU per member
    raw["pool"]["logit_groups"][0]["num_gpus"] = 1
    plan = plan_config(parse_config(raw), Cluster.parse("1x8x40GB"))
    [problem] = plan.problems
    # 3 x 7.62e9 x 2 bytes x 1.2 = 51.1 GiB on one GPU of 40
    assert "group 'fusion'" in problem and "51.1 GiB" in problem
    assert "more than one GPU of 1x8x40GB holds" in problem
    group = next(it for it in plan.items if it.kind == "group")
    assert not group.where


def test_cli_prints_the_plan_and_refuses_what_does_not_fit(tmp_path):
    path = Path(GPU_CONFIGS[0]).parent / "qwen7b_pool.yaml"
    out = CliRunner().invoke(app, ["plan", str(path), "--cluster", "1x8x40GB"])
    assert out.exit_code == 0, out.output
    assert "placement on 1x8x40GB" in out.output and "GPU memory" in out.output
    for name in ("general", "math", "coder", "fusion"):
        assert name in out.output
    assert "fits 1x8x40GB" in out.output
    # six GPUs: not on a node of four
    out = CliRunner().invoke(app, ["plan", str(path), "--cluster", "1x4x40GB"])
    assert out.exit_code == 1 and "does not fit 1x4x40GB" in out.output
    out = CliRunner().invoke(app, ["plan", str(path), "--cluster", "8 GPUs"])
    assert out.exit_code == 2 and "NODESxGPUSxMEMORY" in out.output


def test_cluster_spec():
    assert Cluster.parse("2x8x80GB") == Cluster(2, 8, 80 * GIB)
    assert Cluster.parse("1x1x40gib") == Cluster(1, 1, 40 * GIB)
    assert Cluster.parse("2x0") == Cluster(2, 0, 0)
    assert str(Cluster.parse("1x1x24GB")) == "1x1x24GB"
    for bad in ("0x1x40GB", "2x8", "x8x80GB", "2x8x80TB"):
        with pytest.raises(ValueError, match="NODESxGPUSxMEMORY"):
            Cluster.parse(bad)


def test_tensor_parallel_stays_on_one_node_and_pipeline_stages_may_cross(qwen7b_dir):
    tp4 = {"name": "tp", "path": qwen7b_dir, "num_gpus": 1, "tensor_parallel_size": 4}
    plan = plan_config(run_cfg([tp4, {**tp4, "name": "tp2"}]), Cluster.parse("2x6x80GB"))
    assert plan.fits
    for it in plan.items:
        assert len({n for n, _ in it.where}) == 1 and len(it.where) == 4
    # two of them on one node of 6 cannot both fit; STRICT_PACK never splits one
    assert {it.where[0][0] for it in plan.items} == {0, 1}
    plan = plan_config(run_cfg([{**tp4, "tensor_parallel_size": 8}]), Cluster.parse("2x4x80GB"))
    assert "8 whole GPUs on one node" in plan.problems[0]
    pp = {**tp4, "tensor_parallel_size": 4, "pipeline_parallel_size": 2}
    plan = plan_config(run_cfg([pp]), Cluster.parse("2x4x80GB"))
    assert plan.fits and sorted(plan.items[0].where) == [(n, j) for n in (0, 1) for j in range(4)]
    # weights per GPU: the model split 8 ways
    assert plan.items[0].weights[0] == model_size(ModelSpec(name="x", path=qwen7b_dir),
                                                  "auto").weights // 8


def test_vllm_budget_and_kv_cache_are_checked(qwen7b_dir):
    m = {"name": "m", "path": qwen7b_dir, "num_gpus": 1}
    plan = plan_config(run_cfg([{**m, "gpu_memory_utilization": 0.3}]),
                       Cluster.parse("1x1x40GB"))
    assert "fill its vLLM budget" in plan.problems[0]  # 12 GiB for 14.2 GiB of weights
    # KV per token: 2 x 28 layers x 4 heads x 128 x 2 bytes = 57344; 0.45 x 40 - 14.2 = 3.8 GiB
    plan = plan_config(run_cfg([{**m, "gpu_memory_utilization": 0.45, "max_model_len": 100_000}]),
                       Cluster.parse("1x1x40GB"))
    assert "holds no max_model_len=100000 sequence" in plan.problems[0]
    plan = plan_config(run_cfg([{**m, "max_model_len": 4096}]), Cluster.parse("1x1x40GB"))
    kv = 0.85 * 40 * GIB - plan.items[0].weights[0]
    assert plan.fits and f"KV holds {int(kv // (57344 * 4096))} x 4096" in plan.items[0].note


def test_unknown_size_names_the_model_and_the_fix():
    plan = plan_config(run_cfg([{"name": "hub", "path": "org/not-cached", "num_gpus": 1}]),
                       Cluster.parse("1x1x80GB"))
    [problem] = plan.problems
    assert "'hub' (org/not-cached)" in problem and "set params_b" in problem


def test_autoscaling_starts_at_min_and_notes_what_max_cannot_add(qwen7b_dir):
    m = {"name": "m", "path": qwen7b_dir, "num_gpus": 1,
         "autoscaling": {"min_replicas": 2, "max_replicas": 4}}
    plan = plan_config(run_cfg([m]), Cluster.parse("1x3x80GB"))
    assert plan.fits  # two start, a third can be added, the fourth has no GPU
    assert [it.kind for it in plan.items] == ["replica", "replica", "autoscale", "autoscale"]
    assert [bool(it.where) for it in plan.items] == [True, True, True, False]
    assert any("autoscale 'm' #3" in n for n in plan.notes)


def test_evolve_trainers_go_to_gpus_beside_a_gpu_pool(qwen7b_dir):
    raw = {"pool": {"models": [{"name": "a", "path": qwen7b_dir, "num_gpus": 1},
                               {"name": "b", "path": qwen7b_dir, "num_gpus": 1}]},
           "tasks": [{"name": "max", "source": "synthetic"}],
           "system": {"strategy": "text_majority_vote"},
           "distill": {"num_workers": 2, "zero_stage": 2}}
    cfg = parse_evolve(raw)
    assert cfg.distill.use_gpu and cfg.distill.bf16  # unset: the GPU pool decides
    plan = plan_config(cfg, Cluster.parse("1x8x80GB"))
    trainers = [it for it in plan.items if it.kind == "trainer"]
    assert plan.fits and [len(t.where) for t in trainers] == [2, 2]
    used = {w for it in plan.items for w in it.where}
    assert len(used) == 6  # 2 replicas + 2 trainers x 2 workers, one GPU each
    assert not plan_config(cfg, Cluster.parse("1x4x80GB")).fits
    # a config that says CPU keeps it
    cpu = parse_evolve({**raw, "distill": {"use_gpu": False}})
    assert not cpu.distill.use_gpu and cpu.distill.bf16
    assert plan_config(cpu, Cluster.parse("1x2x80GB")).fits


def test_trainer_estimate_follows_its_formula(qwen7b_dir):
    size = model_size(ModelSpec(name="x", path=qwen7b_dir), "auto")
    p, b = size.params, 2
    cfg = DistillConfig(method="lora", lora_r=8, use_gpu=True, bf16=True, batch_size=4,
                        max_seq_len=1024, zero_stage=2, num_workers=2)
    # LoRA r=8 on all seven projections of 28 layers
    t = 28 * 8 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    acts = 4 * 1024 * (34 * 3584 * 28 * b / 2 + 4 * 152064)
    want = p * b + t * b + t * (b + 8 + 4) / 2 + acts
    got, exact = trainer_bytes(size, cfg)
    assert exact and got == int(want)
    full = cfg.model_copy(update={"method": "full", "zero_stage": 3})
    got, _ = trainer_bytes(size, full)
    assert got == int(p * b / 2 + p * (b + 8 + 4) / 2 + acts)


def test_run_config_plans_max_trainings_adapter_trainers(qwen7b_dir):
    m = {"name": "m", "path": qwen7b_dir, "num_gpus": 1}
    plan = plan_config(run_cfg([m], max_trainings=2), Cluster.parse("1x4x80GB"))
    adapters = [it for it in plan.items if it.kind == "trainer"]
    assert plan.fits and len(adapters) == 2 and all(len(a.where) == 1 for a in adapters)
    assert "bf16" in adapters[0].note  # beside a GPU pool: GPU, bf16
    plan = plan_config(run_cfg([m]), Cluster.parse("1x4x80GB"))
    assert any("max_trainings is unset" in n for n in plan.notes)
