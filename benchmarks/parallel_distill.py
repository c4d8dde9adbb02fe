"""Distill N tiny models at once (distill_all) against one after another, in one run.

    RAY_AUTH_MODE=disabled python benchmarks/parallel_distill.py --n 3 --steps 20

Prints the cluster's CPUs, the wall time of each sequential model, of the whole sequential pass
and of the parallel pass, and parallel / one-model (goal: <= 1.3x when the cluster has room for
all N runs at once; when it has not, Ray queues runs and the ratio grows toward N).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_models(root: Path, n: int) -> list[str]:
    from moco_ray.models import zoo

    tok = zoo.make_tokenizer(root / "tok", zoo.tiny_corpus(), vocab_size=320)
    return [str(zoo.make_tiny_llama(root / f"m{i}", tok, seed=i, hidden_size=64, num_layers=2,
                                    num_heads=2, intermediate_size=128,
                                    max_position_embeddings=256)) for i in range(n)]


def make_rows(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a + b}"}]}
            for a, b in ((i % 9, i // 9) for i in range(count))]


def run(jobs, cfg) -> tuple[float, dict]:
    from moco_ray.training import distill_all

    t0 = time.perf_counter()
    infos = distill_all(jobs, cfg)
    return time.perf_counter() - t0, infos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="models")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per model")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers per model")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="logical CPUs for a local Ray (default: this machine's cores)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed first run (imports, DeepSpeed op build)")
    args = ap.parse_args()

    import ray

    from moco_ray.config import DistillConfig

    ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {
                 k: os.environ[k] for k in ("RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM")}})
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    need = args.n * args.workers * args.cpus_per_worker
    root = Path(tempfile.mkdtemp(prefix="moco_bench_distill_"))
    try:
        models = make_models(root / "models", args.n)
        rows = make_rows(32)
        cfg = DistillConfig(method="lora", zero_stage=2, lr=1e-2, batch_size=4,
                            max_steps=args.steps, num_workers=args.workers,
                            cpus_per_worker=args.cpus_per_worker, report_every=args.steps)
        jobs = [(f"m{i}", m, rows, str(root / "out" / f"{tag}_m{i}"))
                for i, m in enumerate(models) for tag in ("seq", "par")]
        seq_jobs = [j for j in jobs if "/seq_" in j[3]]
        par_jobs = [j for j in jobs if "/par_" in j[3]]
        if not args.no_warmup:
            run([("warmup", models[0], rows, str(root / "out" / "warmup"))], cfg)
        one_times = []
        for job in seq_jobs:
            seconds, _ = run([job], cfg)
            one_times.append(seconds)
        seq_total = sum(one_times)
        par_total, infos = run(par_jobs, cfg)
        windows = sorted((i.train_entered, i.train_finished) for i in infos.values())
        overlap = max(s for s, _ in windows) < min(e for _, e in windows)
        one = sum(one_times) / len(one_times)
        print(f"cluster: {cluster_cpus:g} logical CPUs (machine cores: {os.cpu_count()}); "
              f"{args.n} models x {args.workers} worker(s) x {args.cpus_per_worker:g} CPU "
              f"= {need:g} CPUs wanted at once")
        print(f"one after another: {', '.join(f'{t:.1f}s' for t in one_times)} "
              f"(total {seq_total:.1f}s, one model {one:.1f}s on average)")
        print(f"all at once (distill_all): {par_total:.1f}s; all runs in flight together: "
              f"{overlap}")
        print(f"ratio parallel / one model = {par_total / one:.2f}x (goal <= 1.30x); "
              f"parallel / sequential = {par_total / seq_total:.2f}x")
        if need > cluster_cpus:
            print(f"note: the cluster lacks room for all {args.n} runs at once "
                  f"({need:g} > {cluster_cpus:g} CPUs), so Ray queues some; the goal assumes room")
        procs = args.n * args.workers
        if procs > (os.cpu_count() or 1):
            print(f"note: {procs} worker processes (each busy on at least one thread, plus Ray "
                  f"Train's start-up) share {os.cpu_count()} cores, so the runs slow each other "
                  "down; the goal assumes a core per worker")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
