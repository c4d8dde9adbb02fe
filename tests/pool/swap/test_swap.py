"""Pool-wide hot-swap on a real pool: a vLLM model on 2 replicas, an HF model, a logit group of
both. Every check that says "every replica" asks each replica through Serve's broadcast.

The tests share one pool and run in file order; each one states the version it starts from.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import pytest
import ray
from ports import free_port as _free_port

from moco_ray import models
from moco_ray.config import LogitGroupSpec, ModelSpec, PoolConfig
from moco_ray.models import zoo
from moco_ray.models.checkpoint import write_manifest
from moco_ray.pool import ModelPool
from moco_ray.pool.swap import hotswap as swap_mod
from moco_ray.pool.swap.hotswap import SwapError
from moco_ray.records import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPT = "one two three"




@pytest.fixture(scope="module")
def pool(ray_session):
    cfg = PoolConfig(
        name="swaptest",
        models=[ModelSpec(name="tv", path="zoo:tiny", engine="vllm", dtype="float32",
                          max_model_len=256, num_cpus=0.5, replicas=2, max_ongoing_requests=64),
                ModelSpec(name="th", path="zoo:tiny-s1", engine="hf", dtype="float32",
                          max_model_len=256, num_cpus=0.5)],
        logit_groups=[LogitGroupSpec(name="pair", models=["tv", "th"], num_cpus=0.5)],
        http_port=_free_port())
    p = ModelPool(cfg, seed=0).start(timeout_s=600)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def ckpts(pool, tmp_path_factory):
    """Checkpoint dirs: two good ones (other seeds' weights; one with a distill manifest) and
    broken ones, each made the way it happens for real."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, seed in (("s3", 3), ("s4", 4)):
        out[name] = str(shutil.copytree(models.resolve_path(f"zoo:tiny-s{seed}"), root / name))
    write_manifest(root / "s3", {"model": "tv", "method": "test"})
    weights = "model.safetensors"
    garbage = shutil.copytree(out["s4"], root / "garbage")
    size = (garbage / weights).stat().st_size
    (garbage / weights).write_bytes(os.urandom(size))  # a disk or copy gone wrong
    for name, manifest in (("truncated", False), ("truncated_manifest", True)):
        d = shutil.copytree(out["s3" if manifest else "s4"], root / name)
        data = (d / weights).read_bytes()
        (d / weights).write_bytes(data[:len(data) // 2])  # a save or copy cut short
    zoo.make_tiny_llama(root / "wide", zoo.tiny_tokenizer_dir(), seed=5, hidden_size=128)
    out.update({n: str(root / n) for n in ("garbage", "truncated", "truncated_manifest", "wide")})
    out["root"] = str(root)
    return out


def per_replica(pool, model: str, prompt=PROMPT):
    """(version, token ids) answered by each replica of `model`."""
    gens = pool.handle(model).broadcast("generate", [prompt], GREEDY).results(timeout_s=120)
    return sorted((g[0].version, tuple(g[0].token_ids)) for g in gens)


def infos(pool, model: str) -> list[dict]:
    return pool.handle(model).broadcast("info").results(timeout_s=60)


def wait_for_replacement(pool, model: str, dead: str, n: int, timeout_s: float = 300) -> set:
    """Replica ids of `model` once `n` live replicas answer and `dead` is not among them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answers = pool.handle(model).broadcast("info").results(timeout_s=60,
                                                               return_exceptions=True)
        ids = {a["replica"] for a in answers if isinstance(a, dict)}
        if len(ids) == n and dead not in ids:
            return ids
        time.sleep(0.5)
    raise TimeoutError(f"{model}: replica {dead} was not replaced in {timeout_s:g}s")


@pytest.fixture(scope="module")
def reference(pool, ckpts):
    """Greedy ids of PROMPT under each weights, from an HF engine outside the pool."""
    from moco_ray.config import EngineSpec
    from moco_ray.engines.hf import HFEngine

    async def ids(path):
        eng = HFEngine(EngineSpec(model=path, kind="hf", dtype="float32", max_model_len=256))
        [g] = await eng.generate([PROMPT], GREEDY)
        await eng.shutdown()
        return tuple(g.token_ids)

    refs = {n: asyncio.run(ids(p)) for n, p in
            (("v0", pool.paths["tv"]), ("s3", ckpts["s3"]), ("s4", ckpts["s4"]))}
    assert len(set(refs.values())) == 3, "the test needs weights that answer differently"
    return refs


def test_pool_starts_every_model_at_version_zero(pool, reference):
    assert pool.versions() == {"tv": {"version": 0, "path": pool.paths["tv"]},
                               "th": {"version": 0, "path": pool.paths["th"]}}
    assert per_replica(pool, "tv") == [(0, reference["v0"])] * 2
    assert len({i["replica"] for i in infos(pool, "tv")}) == 2


@pytest.mark.parametrize("name, problem", [
    ("garbage", "corrupt or truncated"),
    ("truncated", "corrupt or truncated"),
    ("truncated_manifest", "does not match the sha256"),
    ("wide", "hidden_size"),
    ("missing", "no such directory"),
])
def test_bad_checkpoints_are_refused_and_the_old_weights_keep_serving(pool, ckpts, reference,
                                                                      name, problem):
    path = ckpts.get(name, os.path.join(ckpts["root"], "missing"))
    with pytest.raises(SwapError, match=problem) as e:
        pool.swap("tv", path)
    assert path in str(e.value) and "old weights keep serving" in str(e.value)
    if name == "wide":  # names the misfitting tensors too
        assert "model.embed_tokens.weight" in str(e.value) and "[849, 128]" in str(e.value)
    assert per_replica(pool, "tv") == [(0, reference["v0"])] * 2
    assert pool.versions()["tv"]["version"] == 0 and len(pool.history("tv")) == 1


def test_swap_reaches_every_replica_and_bumps_the_version(pool, ckpts, reference):
    before = pool.handle("tv").generate.remote([PROMPT], GREEDY).result()[0]
    assert pool.swap("tv", ckpts["s3"]) == 1
    assert per_replica(pool, "tv") == [(1, reference["s3"])] * 2
    assert before.version == 0 and tuple(before.token_ids) == reference["v0"]
    assert {i["weights"] for i in infos(pool, "tv")} == {ckpts["s3"]}
    assert pool.versions()["tv"] == {"version": 1, "path": ckpts["s3"]}
    assert [v.version for v in pool.history("tv")] == [0, 1]
    # lineage through the client (what strategies use) and over HTTP
    [g] = asyncio.run(pool.client().generate("tv", [PROMPT], GREEDY))
    assert (g.model, g.version) == ("tv", 1)
    import httpx

    r = httpx.post(pool.url("tv") + "/completions",
                   json={"model": "tv", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.json()["system_fingerprint"] == "tv-v1"
    # the logit group followed: its copy of tv now holds v1
    group = pool.handle("pair").info.remote().result()
    assert group["versions"] == {"tv": 1, "th": 0} and group["weights"]["tv"] == ckpts["s3"]


def test_requests_in_flight_during_a_swap_all_succeed_with_true_lineage(pool, ckpts, reference):
    """40 requests fired around a swap from v1 (s3) to v2 (s4): none fails, and each answer is
    exactly what the version it reports produces (no answer stamped with the wrong weights)."""
    h = pool.handle("tv")

    async def go():
        swap = asyncio.ensure_future(asyncio.to_thread(pool.swap, "tv", ckpts["s4"]))
        reqs = []
        while not swap.done() or len(reqs) < 40:  # a steady stream across the whole swap
            reqs.append(asyncio.ensure_future(h.generate.remote([PROMPT], GREEDY)))
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*reqs, return_exceptions=True)
        return await swap, results

    version, results = asyncio.run(go())
    assert version == 2 and len(results) >= 40
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    expect = {1: reference["s3"], 2: reference["s4"]}
    assert {r[0].version for r in results} == {1, 2}
    assert all(tuple(r[0].token_ids) == expect[r[0].version] for r in results)
    assert per_replica(pool, "tv") == [(2, reference["s4"])] * 2


def test_rollback_restores_earlier_outputs_and_versions(pool, ckpts, reference):
    assert pool.rollback("tv") == 1  # the previous one: v2 -> v1
    assert per_replica(pool, "tv") == [(1, reference["s3"])] * 2
    assert pool.rollback("tv", version=0) == 0
    assert per_replica(pool, "tv") == [(0, reference["v0"])] * 2
    assert pool.versions()["tv"] == {"version": 0, "path": pool.paths["tv"]}
    # the group is back on its start combination, so on its start version number
    assert pool.handle("pair").info.remote().result()["version"] == 0
    with pytest.raises(SwapError, match="nothing earlier"):
        pool.rollback("tv")
    with pytest.raises(SwapError, match=r"valid: \[0, 1, 2\]"):
        pool.rollback("tv", version=7)
    assert pool.rollback("tv", version=2) == 2  # forward again, to a kept version
    assert per_replica(pool, "tv") == [(2, reference["s4"])] * 2
    assert pool.handle("pair").info.remote().result()["versions"]["tv"] == 2
    assert pool.swap("tv", ckpts["s3"]) == 3  # new numbers continue after the highest


def test_a_replica_failing_to_load_puts_every_replica_back(pool, ckpts, reference):
    """Checkpoint damaged after validation: a replica's engine refuses it, the swap is undone on
    all replicas (and the group) and marked failed in the history."""
    before = per_replica(pool, "tv")
    assert before == [(3, reference["s3"])] * 2

    async def unvalidated_swap():
        reg = swap_mod.registry(pool._registry)
        token = await reg.acquire.remote("tv", 60, 120)
        try:
            prev = await reg.current.remote("tv")
            target = await reg.propose.remote("tv", ckpts["wide"])
            await swap_mod._roll_to(reg, "tv", target, prev, 120, new=True)
        finally:
            await reg.release.remote("tv", token)

    with pytest.raises(SwapError, match="back on v3") as e:
        asyncio.run(unvalidated_swap())
    assert "shape" in str(e.value) and ckpts["wide"] in str(e.value)  # a replica's own check
    assert per_replica(pool, "tv") == before
    assert pool.handle("pair").info.remote().result()["versions"]["tv"] == 3
    assert pool.history("tv")[-1].failed and pool.versions()["tv"]["version"] == 3
    with pytest.raises(SwapError, match=r"valid: \[0, 1, 2, 3\]"):
        pool.rollback("tv", version=4)  # a failed version is not a rollback target


def test_a_restarted_replica_comes_up_on_the_current_version(pool, reference):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{pool.app_name('tv')}#")]
    assert len(names) == 2
    dead = names[0].rsplit("#", 1)[1]
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    ids = wait_for_replacement(pool, "tv", dead, 2)  # Serve starts a new one from the deployment
    assert len(ids - {n.rsplit("#", 1)[1] for n in names}) == 1
    # ... which was deployed with v0's path, yet serves the current version
    assert per_replica(pool, "tv") == [(3, reference["s3"])] * 2


def test_logit_group_decodes_with_a_swapped_members_new_weights(pool, ckpts):
    client = pool.client()
    onehot = [0.0, 1.0]  # all weight on th: fused decoding is th's own greedy decoding

    async def fused_and_single():
        [f] = await client.fused_generate("pair", [PROMPT], GREEDY, "fusion", onehot)
        [s] = await client.generate("th", [PROMPT], GREEDY)
        return f, s

    f0, s0 = asyncio.run(fused_and_single())
    assert f0.token_ids == s0.token_ids and s0.version == 0
    assert pool.swap("th", ckpts["s4"]) == 1
    f1, s1 = asyncio.run(fused_and_single())
    assert s1.version == 1 and s1.token_ids != s0.token_ids
    assert f1.token_ids == s1.token_ids
    # a fused Generation's version names the members' versions that made it
    lineage = pool.group_versions("pair")
    assert lineage[f0.version] == {"tv": 3, "th": 0} and lineage[f1.version] == {"tv": 3, "th": 1}
    info = pool.handle("pair").info.remote().result()
    assert info["versions"] == {"tv": 3, "th": 1} and info["version"] == f1.version


def test_a_handle_load_weights_is_pool_wide_and_errors_name_the_model(pool, ckpts, reference):
    # load_weights through a handle reaches one replica, but swaps all of them.
    assert pool.handle("tv").load_weights.remote(ckpts["s4"]).result() == 5
    assert per_replica(pool, "tv") == [(5, reference["s4"])] * 2
    with pytest.raises(KeyError, match="'tv'"):
        pool.swap("nope", ckpts["s3"])
    adapter = os.path.join(ckpts["root"], "adapter")
    os.makedirs(adapter, exist_ok=True)
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA"}, f)
    with pytest.raises(SwapError, match="LoRA adapter"):
        pool.swap("tv", adapter)


def test_validate_refuses_another_tokenizer_vocabulary(pool, ckpts, tmp_path):
    d = shutil.copytree(ckpts["s4"], tmp_path / "vocab")
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, same shapes, other ids
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SwapError, match="tokenizer vocabulary differs"):
        swap_mod.validate(str(d), pool.paths["tv"])
    swap_mod.validate(ckpts["s4"], pool.paths["tv"])  # the untouched copy passes
