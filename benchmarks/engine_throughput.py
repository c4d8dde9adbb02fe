"""Generated tokens per second of the HF and vLLM engines, side by side, on the same models.

    .venv/bin/python benchmarks/engine_throughput.py [--batch 16] [--max-tokens 64]
        [--models zoo:tiny zoo:smollm2-135m-instruct] [--repeats 2]

One batch of `--batch` chat prompts, greedy, `--max-tokens` new tokens at most; both engines
decode the same tokens (engine parity), so the count of generated tokens is the same for both.
Engine start and one warm-up batch are not timed. Models build into the zoo cache on first use.
"""
from __future__ import annotations

import argparse
import asyncio
import time

from moco_ray import models
from moco_ray.config import EngineSpec
from moco_ray.engines.registry import build_engine
from moco_ray.records import SamplingParams

TOPICS = ["the sea", "a robot", "winter", "a lost key", "trains", "the moon", "bread", "a river",
          "chess", "a small town", "music", "rain", "a lighthouse", "bees", "mountains", "a clock"]


def prompts(n: int) -> list:
    return [[{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(n)]


async def measure(kind: str, path: str, batch: int, max_tokens: int, repeats: int) -> dict:
    engine = build_engine(EngineSpec(model=path, kind=kind, dtype="float32", max_model_len=1024))
    params = SamplingParams(max_tokens=max_tokens)
    try:
        if kind == "vllm":
            await engine.start()
        await engine.generate(prompts(batch), params)  # warm-up
        best, tokens = float("inf"), 0
        for _ in range(repeats):
            start = time.perf_counter()
            gens = await engine.generate(prompts(batch), params)
            best = min(best, time.perf_counter() - start)
            tokens = sum(g.completion_tokens for g in gens)
        return {"tokens": tokens, "seconds": best, "tok_s": tokens / best,
                "ids": [g.token_ids for g in gens]}
    finally:
        await engine.shutdown()


async def main(args) -> None:
    rows = []
    for model in args.models:
        path = models.resolve_path(model)
        hf = await measure("hf", path, args.batch, args.max_tokens, args.repeats)
        vl = await measure("vllm", path, args.batch, args.max_tokens, args.repeats)
        same = sum(a == b for a, b in zip(hf["ids"], vl["ids"]))
        rows.append((model, hf, vl, same))
    print(f"\nbatch {args.batch} chat prompts, greedy, <= {args.max_tokens} new tokens, "
          f"best of {args.repeats}")
    print(f"{'model':<28}{'tokens':>8}{'hf tok/s':>11}{'vllm tok/s':>12}{'vllm/hf':>9}"
          f"{'same ids':>10}")
    for model, hf, vl, same in rows:
        print(f"{model:<28}{vl['tokens']:>8}{hf['tok_s']:>11.1f}{vl['tok_s']:>12.1f}"
              f"{vl['tok_s'] / hf['tok_s']:>9.2f}{same:>7}/{args.batch}")


if __name__ == "__main__":  # vLLM spawns its engine core: this guard is required
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["zoo:tiny", "zoo:smollm2-135m-instruct"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
