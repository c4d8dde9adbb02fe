"""Streaming merges (`_merge.stream_merge`): exactly the in-memory math, written in bounded
shards that transformers loads, Model Swarms' dir-backed swarm equal to the in-memory one, and
a merge's peak memory, measured in a subprocess, far below the members' size."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moco_ray.strategies.base import StrategyContext
from moco_ray.strategies.weight import _merge as M
from moco_ray.strategies.weight.model_swarms import (
    SwarmDirs,
    SwarmSettings,
    WeightSwarm,
    partner_velocities,
)

SHAPES = {"embed.weight": (50, 16), "layers.0.proj.weight": (16, 16), "layers.0.norm": (16,),
          "layers.1.proj.weight": (16, 16), "layers.1.norm": (16,), "head.weight": (50, 16)}


def _member(path: Path, seed: int, dtype=torch.float32, shard_at: str | None = None) -> Path:
    """A model dir with SHAPES (random values) plus an integer buffer; split into two files at
    tensor `shard_at` (with an index) when given."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    tensors["position_ids"] = torch.arange(8)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    if shard_at is None:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = list(tensors)
    cut = names.index(shard_at)
    parts = {"a.safetensors": names[:cut], "b.safetensors": names[cut:]}
    for f, ks in parts.items():
        save_file({k: tensors[k] for k in ks}, str(path / f))
    (path / M.INDEX_FILE).write_text(json.dumps(
        {"weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    return path


def _load(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def three(tmp_path):
    """Three bf16 members (the second stored as two files with an index) and their float32
    state dicts in memory."""
    dirs = [_member(tmp_path / f"m{i}", i, torch.bfloat16,
                    shard_at="layers.1.proj.weight" if i == 1 else None) for i in range(3)]
    states = [{k: (t.float() if t.is_floating_point() else t) for k, t in _load(d).items()}
              for d in dirs]
    return [M.WeightsDir(d) for d in dirs], states


def _merge(tmp_path, inputs, fn, name, shard_bytes=2048, dtypes=None):
    out = M.Output(tmp_path / name, dtypes)
    [path] = M.stream_merge(inputs, fn, [out], shard_bytes=shard_bytes)
    return path


def test_streamed_linear_dare_ties_and_extrapolate_equal_the_in_memory_math(tmp_path, three):
    ws, states = three
    # linear: the state-dict merge, and the sum written out by hand
    got = _load(_merge(tmp_path, ws, M.linear_fn([0.5, 0.3, -0.2]), "lin"))
    want = M.linear(states, [0.5, 0.3, -0.2])
    assert set(got) == set(want) == set(SHAPES) | {"position_ids"}
    for k in SHAPES:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k])
        by_hand = 0.5 * states[0][k] + 0.3 * states[1][k] - 0.2 * states[2][k]
        assert torch.allclose(got[k], by_hand, atol=1e-6, rtol=0)
    assert torch.equal(got["position_ids"], torch.arange(8))
    # DARE-TIES, with random masks and a trim: per-tensor seeds make it exactly the in-memory one
    base, members = ws[0], ws[1:]

    def fn(name, ts):
        return M.dare_ties_tensor(name, ts[0], ts[1:], [0.6, 0.4], 0.5, 0.7, seed=11)

    got = _load(_merge(tmp_path, [base, *members], fn, "dt"))
    want = M.dare_ties(states[0], states[1:], [0.6, 0.4], 0.5, 0.7, seed=11)
    for k in SHAPES:
        assert torch.equal(got[k], want[k]), k
    # ...and independent of the order the tensors are visited in
    backwards = dict(reversed(list(states[0].items())))
    rev = M.dare_ties(backwards, states[1:], [0.6, 0.4], 0.5, 0.7, seed=11)
    other_seed = M.dare_ties(states[0], states[1:], [0.6, 0.4], 0.5, 0.7, seed=12)
    assert all(torch.equal(rev[k], want[k]) for k in SHAPES)
    assert not torch.equal(other_seed["embed.weight"], want["embed.weight"])
    # ExPO: theta1 + alpha (theta1 - theta0)
    got = _load(_merge(tmp_path, [ws[2], ws[0]],
                       lambda name, ts: M.extrapolate_tensor(ts[0], ts[1], 0.3), "ex"))
    want = M.extrapolate(states[2], states[0], 0.3)
    for k in SHAPES:
        assert torch.equal(got[k], want[k])
        by_hand = 1.3 * states[2][k] - 0.3 * states[0][k]
        assert torch.allclose(got[k], by_hand, atol=1e-5, rtol=0)


def test_outputs_are_sharded_like_transformers_and_cast_to_the_given_dtypes(tmp_path, three):
    ws, states = three
    total = sum(i.nbytes for k, i in ws[0].tensors.items())  # bf16 + the int64 buffer
    path = Path(_merge(tmp_path, ws[:2], M.linear_fn([0.5, 0.5]), "soup", shard_bytes=1024,
                       dtypes=ws[0].dtypes))
    files = sorted(p.name for p in path.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((path / M.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(ws[0].tensors) and set(index["weight_map"].values()) \
        == set(files)
    for f in files:  # within the bound, except a shard holding one tensor larger than it
        tensors = load_file(str(path / f))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 1024 or len(tensors) == 1
    merged = M.WeightsDir(path)
    assert merged.dtypes == ws[0].dtypes  # bf16 as the members, the buffer int64
    want = M.linear(states[:2], [0.5, 0.5])
    for k in SHAPES:
        assert torch.equal(merged.read(k), want[k].to(torch.bfloat16))
    # one shard when it fits: a single model.safetensors, no index
    path = Path(_merge(tmp_path, ws[:2], M.linear_fn([0.5, 0.5]), "one", shard_bytes=1 << 20))
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors"]


def test_a_sharded_merge_loads_in_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"m{seed}")
        dirs.append(tmp_path / f"m{seed}")
    ws = [M.WeightsDir(d) for d in dirs]
    out = M.Output(tmp_path / "soup", ws[0].dtypes, dirs[0])
    [path] = M.stream_merge(ws, M.linear_fn([0.5, 0.5]), [out], shard_bytes=8192)
    assert len(list(Path(path).glob("model-*-of-*.safetensors"))) > 3
    model = LlamaForCausalLM.from_pretrained(path)
    want = M.linear([_load(d) for d in dirs], [0.5, 0.5])
    got = model.state_dict()
    assert set(want) <= set(got)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_merges_refuse_inputs_of_another_architecture_from_the_headers(tmp_path, three):
    ws, _ = three
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({k: torch.zeros(s) for k, s in SHAPES.items() if k != "head.weight"}
              | {"position_ids": torch.arange(8)}, str(odd / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*head.weight"):
        _merge(tmp_path, [ws[0], M.WeightsDir(odd)], M.linear_fn([0.5, 0.5]), "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    (odd / M.INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="lacks: \\['gone.safetensors'\\]"):
        M.WeightsDir(odd)


def test_a_failed_merge_leaves_no_output(tmp_path, three):
    ws, _ = three

    def fn(name, ts):
        if name == "layers.1.norm":
            raise RuntimeError("boom")
        return ts[0]

    with pytest.raises(RuntimeError, match="boom"):
        _merge(tmp_path, ws[:1], fn, "half", shard_bytes=512)
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half*"))


# --- Model Swarms over dirs -----------------------------------------------------------------------

class _NoPool:
    """The swarm under test scores nothing: no pool calls."""

    def __init__(self):
        self.models: list[str] = []


def test_the_dir_swarm_moves_exactly_as_the_in_memory_swarm(tmp_path, three):
    ws, states = three
    names = ["m0", "m1", "m2"]
    ctx = StrategyContext(_NoPool(), None, names, scratch="scratch", workdir=str(tmp_path / "w"))
    members = M.Members(names=names, dirs={n: str(w.path) for n, w in zip(names, ws)},
                        weights=dict(zip(names, ws)), template=str(ws[0].path))
    params = M.WeightFields()
    cands = M.Candidates(ctx, None, params, "swarm", members)
    space = SwarmDirs(cands, members)
    settings = SwarmSettings(restart_patience=1, patience=10)
    mem_states = [dict(s) for s in states]
    mem = WeightSwarm(mem_states, partner_velocities(mem_states, random.Random(3)), settings,
                      random.Random(5))
    positions = [members.dirs[n] for n in names]
    disk = WeightSwarm(positions, partner_velocities(positions, random.Random(3),
                                                     space.difference),
                       settings, random.Random(5), space.move)
    scores = random.Random(0)
    for it in range(4):
        s = [scores.random() for _ in names]
        tags = [space.candidate[x] for x in disk.positions]
        assert mem.update(s) is False and disk.update(s, tags) is False
        space.collect(disk.live())
        for i in range(3):
            x, v = M.WeightsDir(disk.positions[i]), M.WeightsDir(disk.velocities[i])
            for k in SHAPES:
                assert torch.equal(x.read(k), mem.positions[i][k]), (it, i, k)
                assert torch.equal(v.read(k), mem.velocities[i][k]), (it, i, k)
            cand = M.WeightsDir(space.candidate[disk.positions[i]])  # served in bf16
            assert torch.equal(cand.read("embed.weight"),
                               mem.positions[i]["embed.weight"].to(torch.bfloat16))
            assert Path(cand.path, "config.json").is_file()
        # only what the swarm still refers to is kept on disk
        kept = {str(p) for p in space.root.iterdir()}
        assert kept == {d for d in disk.live() if d is not None} - set(members.dirs.values())
    assert disk.restarts == mem.restarts > 0
    space.clear()
    assert not space.root.exists()


# --- peak memory --------------------------------------------------------------------------------

_PEAK = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from safetensors.torch import load_file
    from moco_ray.strategies.weight import _merge as M

    mode, out, *dirs = sys.argv[1:]
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    ws = [M.WeightsDir(d) for d in dirs]
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    if mode == "stream":
        M.stream_merge(ws, M.linear_fn([1 / len(ws)] * len(ws)), [M.Output(Path(out))],
                       shard_bytes=32 << 20)
    else:  # the soup over whole state dicts in memory, as merges did before streaming
        states = [{k: t for p in sorted(w.path.glob("*.safetensors"))
                   for k, t in load_file(str(p)).items()} for w in ws]
        assert len(M.uniform_soup(states)) == len(ws[0].tensors)
    print(json.dumps({"growth": status("VmHWM") - before}))
''')


def _peak(mode: str, out: Path, dirs: list[Path]) -> int:
    r = subprocess.run([sys.executable, "-c", _PEAK, mode, str(out), *map(str, dirs)],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["growth"]


def test_a_streamed_merge_peaks_far_below_the_members_size(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    dirs = []
    for m in range(2):  # two members of 12 x 16 MiB float32 tensors: 192 MiB each
        d = tmp_path / f"m{m}"
        d.mkdir()
        for f in range(3):  # in three files, as a sharded checkpoint
            save_file({f"t{f}.{i}": torch.full((1024, 4096), 10.0 * m + 4 * f + i)
                       for i in range(4)}, str(d / f"part{f}.safetensors"))
        dirs.append(d)
    total = sum(M.WeightsDir(d).nbytes for d in dirs)
    assert total == 2 * 192 << 20
    whole = _peak("whole", tmp_path / "unused", dirs)
    streamed = _peak("stream", tmp_path / "soup", dirs)
    print(f"peak RSS growth: whole {whole >> 20} MiB, streamed {streamed >> 20} MiB, "
          f"members {total >> 20} MiB")
    # The measure sees whole models (the old way) ...
    assert whole > 0.9 * total
    # ... and a streamed merge holds about 2 input tensors, the sum and one 32 MiB shard.
    assert streamed < 0.3 * total, (streamed >> 20, total >> 20)
    soup = M.WeightsDir(tmp_path / "soup")
    assert len({i.file for i in soup.tensors.values()}) == 6  # 192 MiB in 32 MiB shards
    assert torch.equal(soup.read("t1.2"), torch.full((1024, 4096), 0.5 * 6 + 0.5 * 16))
