"""Hot-swap vs restart: how long from "checkpoint ready on disk" to "new weights serving", and
how many requests fail on the way, under a steady stream of requests.

    .venv/bin/python benchmarks/hot_swap.py [--replicas 2] [--rounds 3] [--rate 25]

A tiny pool (one vLLM model, `--replicas` replicas) serves a stream of greedy requests at
`--rate` per second the whole time. Hot swap: `ModelPool.swap` to another checkpoint (a copy of
zoo:tiny-s3 / -s4 with a distill manifest, so validation hashes the files), `--rounds` times.
Restart: delete the model's Serve app and deploy it again on another checkpoint. One untimed
warm-up swap comes first. "Serving" is
the first answer (by completion time) carrying the new weights' greedy tokens, and for the swap
also the new version number. Engine start and warm-up happen before any clock starts.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

for k, v in (("RAY_AUTH_MODE", "disabled"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
             ("VLLM_CPU_KVCACHE_SPACE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(k, v)

import ray
from ray import serve

from moco_ray import models
from moco_ray.config import ModelSpec, PoolConfig
from moco_ray.models.checkpoint import write_manifest
from moco_ray.pool import ModelPool
from moco_ray.pool.server import ModelServer
from moco_ray.records import SamplingParams

PROMPT = "one two three"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


class Stream:
    """Fires one request every 1/rate s until stopped; logs (sent, done, version, ids, error)."""

    def __init__(self, handle, rate: float):
        self.handle, self.interval, self.log = handle, 1.0 / rate, []
        self._stop = asyncio.Event()

    async def _one(self) -> None:
        sent = time.perf_counter()
        try:
            [g] = await asyncio.wait_for(self._call(), timeout=120)
            self.log.append((sent, time.perf_counter(), g.version, tuple(g.token_ids), None))
        except Exception as e:  # noqa: BLE001 - a failed request is what we count
            self.log.append((sent, time.perf_counter(), None, None, f"{type(e).__name__}: {e}"))

    async def _call(self):
        return await self.handle.generate.remote([PROMPT], GREEDY)

    async def run(self) -> None:
        tasks = []
        while not self._stop.is_set():
            tasks.append(asyncio.create_task(self._one()))
            await asyncio.sleep(self.interval)
        await asyncio.gather(*tasks)

    def stop(self) -> None:
        self._stop.set()


def first_new(log, since: float, ids: tuple, version: int | None) -> float | None:
    done = [d for s, d, v, i, err in log if err is None and d >= since and i == ids
            and (version is None or v == version)]
    return min(done) - since if done else None


def checkpoint(root: str, zoo_name: str, name: str) -> str:
    """A distilled-style checkpoint: a model dir plus its manifest (sha256 of the weights)."""
    out = shutil.copytree(models.resolve_path(zoo_name), Path(root) / name)
    write_manifest(out, {"model": "bench", "method": "copy"})
    return str(out)


async def bench(pool: ModelPool, args, root: str) -> dict:
    h = pool.handle("bench")
    stream = Stream(h, args.rate)
    runner = asyncio.create_task(stream.run())
    await asyncio.sleep(1.0)  # the stream is steady before the first clock starts
    start_ids = next(e[3] for e in stream.log if e[2] == 0)
    # Untimed warm-up swap (to a copy of the start weights): one-time imports on the driver
    # (validation) and in the replicas (vLLM's reload path) are not what a swap costs.
    await asyncio.to_thread(pool.swap, "bench", checkpoint(root, "zoo:tiny", "warmup"))
    swaps = []
    for r in range(args.rounds):
        # alternate between two other weights, so each round changes the answers
        path = checkpoint(root, f"zoo:tiny-s{3 + r % 2}", f"round{r}")
        t0 = time.perf_counter()  # checkpoint ready on disk
        version = await asyncio.to_thread(pool.swap, "bench", path)
        returned = time.perf_counter() - t0
        [g] = await h.generate.remote([PROMPT], GREEDY)
        assert g.version == version and tuple(g.token_ids) != start_ids
        await asyncio.sleep(0.5)
        serving = first_new(stream.log, t0, tuple(g.token_ids), version)
        swaps.append({"round": r, "version": version, "serving_s": serving,
                      "returned_s": returned})

    # Restart: delete the app and deploy it again, on the weights it started with (a copy).
    path = checkpoint(root, "zoo:tiny", "restart")
    m = pool.config.models[0]
    t0 = time.perf_counter()
    await asyncio.to_thread(_redeploy, pool, m, path)
    returned = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    restart = {"serving_s": first_new(stream.log, t0, start_ids, None), "returned_s": returned}
    stream.stop()
    await runner
    swap_window = [e for e in stream.log if e[0] < t0]
    restart_window = [e for e in stream.log if e[0] >= t0]
    return {"swaps": swaps, "restart": restart,
            "swap_requests": len(swap_window),
            "swap_failed": [e[4] for e in swap_window if e[4]],
            "restart_requests": len(restart_window),
            "restart_failed": [e[4] for e in restart_window if e[4]]}


def _redeploy(pool: ModelPool, m: ModelSpec, path: str) -> None:
    app = pool.app_name(m.name)
    serve.delete(app)
    dep = ModelServer.options(num_replicas=m.replicas, max_ongoing_requests=m.max_ongoing_requests,
                              ray_actor_options={"num_cpus": m.num_cpus})
    serve.run(dep.bind(m.name, m.engine_spec(path, seed=pool.seed)), name=app,
              route_prefix=f"/{m.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=25.0, help="requests per second")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                      "VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM")}
    logging.getLogger("ray.serve").setLevel(logging.ERROR)  # queue-probe noise on a busy CPU
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    cfg = PoolConfig(name="hotswap", http_port=port, models=[ModelSpec(
        name="bench", path="zoo:tiny", engine="vllm", dtype="float32", max_model_len=256,
        num_cpus=0.5, replicas=args.replicas, max_ongoing_requests=64)])
    pool = ModelPool(cfg)
    root = tempfile.mkdtemp(prefix="hot_swap_")
    try:
        pool.start()
        out = asyncio.run(bench(pool, args, root))
    finally:
        pool.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    report(out, args)


def report(out: dict, args) -> None:
    print(f"\n{args.replicas} vLLM replicas of zoo:tiny, {args.rate:g} req/s steady stream, "
          f"greedy 8 tokens; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':<22}{'ready->serving (s)':>20}{'call returned (s)':>19}")
    for s in out["swaps"]:
        print(f"{'hot swap v' + str(s['version']):<22}{_fmt(s['serving_s']):>20}"
              f"{_fmt(s['returned_s']):>19}")
    print(f"{'restart':<22}{_fmt(out['restart']['serving_s']):>20}"
          f"{_fmt(out['restart']['returned_s']):>19}")
    served = [s["serving_s"] for s in out["swaps"] if s["serving_s"] is not None]
    swap_med = statistics.median(served) if served else None
    r = out["restart"]["serving_s"]
    print(f"\nhot swap: median {_fmt(swap_med)} s, {len(out['swap_failed'])} failed of "
          f"{out['swap_requests']} requests")
    print(f"restart:  {_fmt(r)} s, {len(out['restart_failed'])} failed of "
          f"{out['restart_requests']} requests")
    if swap_med and r:
        print(f"restart / hot swap: {r / swap_med:.1f}x")
    for e in sorted(set(out["swap_failed"] + out["restart_failed"]))[:5]:
        print("  failure:", e[:200])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
