"""GPU smoke test of a moco_ray install: one model distilled on GPU, served, asked, hot-swapped.

NOT RUN in the project's dev environment (it has no GPU): written for a GPU node or cluster set
up with `bash cluster/install.sh gpu` or the Dockerfile's image (docs/cluster.md).

    python cluster/gpu_smoke.py [CONFIG] [--model NAME] [--steps 2] [--out DIR]

CONFIG (default configs/gpu/qwen_small_pool.yaml) names the model: the `pool.models` entry
called --model (default: the first one), served alone with its own engine settings. Steps, each
timed:
  ray      attach to $RAY_ADDRESS or a `ray start`ed cluster, else start a local Ray; fail
           unless the cluster has a GPU
  distill  a --steps step LoRA distillation of the model on one GPU (Ray Train + DeepSpeed,
           bf16) over synthetic `add` training pairs, merged into a checkpoint under --out
  serve    the model as a one-model pool (a Ray Serve deployment)
  chat     one chat completion over the model's OpenAI-compatible HTTP route, from version 0
  swap     hot-swap the distilled checkpoint in; a second chat must come from the new version
The distillation runs before the pool starts: its Ray Train worker takes a whole GPU, which a
one-GPU node cannot give beside a replica that holds part of it. On a multi-node cluster --out
must be storage every node sees (the replica reads the checkpoint the trainer wrote).

Prints one line per step with its seconds; exits 0 when every step passed, else 1 after
naming the failed step and its error. `--cpu` runs the same steps without a GPU (a CPU
config's model, trained on CPU): a check of the script itself, not of a GPU install.
"""
from __future__ import annotations

import argparse
import math
import shutil
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is 2 plus 3? Answer with the number."


class StepFailed(Exception):
    pass


@contextmanager
def step(name: str, timings: dict[str, float]):
    """Time one step; any error ends the smoke test naming the step."""
    t0 = time.perf_counter()
    print(f"[{name}] ...", flush=True)
    try:
        yield
    except Exception as e:
        traceback.print_exc()
        raise StepFailed(f"step {name!r} failed after {time.perf_counter() - t0:.1f}s: "
                         f"{type(e).__name__}: {e}") from e
    timings[name] = time.perf_counter() - t0
    print(f"[{name}] ok in {timings[name]:.1f}s", flush=True)


def chat(pool, model: str) -> tuple[str, str]:
    """(answer, system_fingerprint) of one greedy chat completion over HTTP."""
    import httpx

    r = httpx.post(f"{pool.url(model)}/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 16, "temperature": 0.0})
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
    body = r.json()
    return body["choices"][0]["message"]["content"], body.get("system_fingerprint", "")


def smoke(args, timings: dict[str, float]) -> None:
    import ray

    from moco_ray.config import DistillConfig, PoolConfig, read_yaml
    from moco_ray.models import resolve_path
    from moco_ray.pool import ModelPool
    from moco_ray.tasks import synthetic_pairs
    from moco_ray.training import distill_all
    from moco_ray.workflows.runtime import init_ray

    raw_pool = read_yaml(args.config).get("pool")
    if not isinstance(raw_pool, dict) or not raw_pool.get("models"):
        raise SystemExit(f"{args.config}: no pool.models")
    specs = {m.get("name"): m for m in raw_pool["models"]}
    name = args.model or next(iter(specs))
    if name not in specs:
        raise SystemExit(f"{args.config}: no pool model {name!r}; models: {list(specs)}")
    with socket.socket() as s:  # Serve's HTTP port, unless Serve already runs on the cluster
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = PoolConfig.model_validate({**raw_pool, "name": "gpusmoke", "models": [specs[name]],
                                     "logit_groups": [], "http_port": port})
    spec = cfg.models[0]
    out = Path(args.out or tempfile.mkdtemp(prefix="moco_gpu_smoke_")).resolve()
    print(f"model {name} ({spec.path}, engine {spec.engine}); files under {out}")

    try:
        with step("ray", timings):
            print(f"  Ray: {init_ray()}; resources {ray.cluster_resources()}")
            if not args.cpu and ray.cluster_resources().get("GPU", 0) < 1:
                raise RuntimeError("the Ray cluster has no GPU")
        with step("distill", timings):
            base = resolve_path(spec.path)  # hub models are fetched once, into the HF cache
            rows = [{"messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": a}]}
                    for q, a in synthetic_pairs("add", 64)]
            dcfg = DistillConfig(method="lora", max_steps=args.steps, batch_size=4,
                                 max_seq_len=128, lr=1e-4, use_gpu=not args.cpu,
                                 bf16=not args.cpu,
                                 report_every=1, storage_path=str(out / "train"))
            info = distill_all([(name, base, rows, str(out / "ckpt"))], dcfg)[name]
            print(f"  {info.steps} steps, losses {[round(x, 4) for x in info.losses]}, "
                  f"checkpoint {info.path}")
            if info.steps != args.steps or not all(math.isfinite(x) for x in info.losses):
                raise RuntimeError(f"expected {args.steps} steps with finite losses, got "
                                   f"{info.steps}: {info.losses}")
        pool = ModelPool(cfg)
        try:
            with step("serve", timings):
                pool.start(timeout_s=args.timeout)
            with step("chat", timings):
                answer, fingerprint = chat(pool, name)
                print(f"  answer {answer!r} ({fingerprint})")
                if fingerprint != f"{name}-v0":
                    raise RuntimeError(f"expected the start weights ({name}-v0), got "
                                       f"{fingerprint!r}")
            with step("swap", timings):
                version = pool.swap(name, info.path, timeout_s=args.timeout)
                answer, fingerprint = chat(pool, name)
                print(f"  version {version}; answer {answer!r} ({fingerprint})")
                if version < 1 or fingerprint != f"{name}-v{version}":
                    raise RuntimeError(f"swap returned version {version}, the next answer came "
                                       f"from {fingerprint!r}")
        finally:
            pool.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.out and not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", type=Path,
                    default=ROOT / "configs" / "gpu" / "qwen_small_pool.yaml")
    ap.add_argument("--model", help="pool model to use (default: the config's first)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps of the distillation")
    ap.add_argument("--out", help="dir for the checkpoint and Ray Train storage (default: a "
                    "temp dir, removed at the end); on a multi-node cluster, shared storage")
    ap.add_argument("--keep", action="store_true", help="keep the default temp dir")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for start and swap")
    ap.add_argument("--cpu", action="store_true", help="train on CPU and need no GPU: checks this "
                    "script on a CPU machine with a CPU config (e.g. configs/sweeps/tiny_sweep.yaml)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        smoke(args, timings)
    except StepFailed as e:
        print(f"GPU SMOKE FAILED: {e}", file=sys.stderr)
        return 1
    print("GPU smoke passed: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
          + f"; total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
