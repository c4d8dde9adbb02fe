"""A sweep of every registered method over one task with a 3-model pool: moco_ray's long-lived
pool against a baseline that loads, generates and frees each model per call, as the MoCo
reference library does. Goal of the issue: the pool at least 10x faster over the sweep.

Both sides run the same strategy code through `moco_ray.coordinator.run_job`, on the same task,
models, params and seed; only the PoolClient differs:
- pool:     `ModelPool(...).client()`, Serve deployments started once (3 vLLM members with LoRA
            serving, a logit group of all three, a scratch deployment for weight candidates);
- baseline: `bench_baseline.ReloadPerCallClient`, which on every generate/score call
            loads tokenizer + model from disk with transformers and frees them after. Its
            per-call equivalents: LoRA = base + peft adapter loaded per call; generate_with =
            the candidate weights dir loaded per call; fused_generate = every group member
            loaded per call and decoded in lockstep. Calls run one at a time (one model in
            memory), as in the reference. A method needing anything else fails on the baseline
            and is listed as skipped with the reason.

Training (methods that fit adapters) runs the same trainer code on both sides and is timed as
part of the method: the pool side on warm trainers (one long-lived Ray Train run, as a sweep with
`warm_trainers: true`; `--cold-trainers` turns that off), the baseline starting a Ray Train run
for every training, as the reference starts a trainer per training. `--train-steps` caps those
methods' step counts (max_steps / train_steps) to keep a CPU run short, and `--max-trainings`
caps the Ray Train runs at once (a method's adapters then train in turn in shared runs). Every
method is timed end to end: fit on dev, then solve on test.

    .venv/bin/python benchmarks/sweep_vs_reload.py [--examples 8] [--methods a,b] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass

# Local runs: no token auth, in-process vLLM engine cores with a small KV cache (set before Ray
# starts: its workers inherit them).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moco_ray.config import LogitGroupSpec, ModelSpec, PoolConfig

TASK = "max"
GROUP = "trio"
SCRATCH = "scratch"
TRAIN_STEP_FIELDS = ("max_steps", "train_steps")


def _member(name: str, path: str, **kw) -> ModelSpec:
    return ModelSpec(name=name, path=path, engine="vllm", dtype="float32", max_model_len=1024,
                     num_cpus=0.5, **kw)


def pool_config(port: int = 0) -> PoolConfig:
    members = [_member("reverser", "zoo:spec-reverse", enable_lora=True),
               _member("maxer", "zoo:spec-max", enable_lora=True),
               _member("sorter", "zoo:spec-sort", enable_lora=True)]
    scratch = _member(SCRATCH, "zoo:spec-reverse", role="scratch")
    return PoolConfig(name="sweepbench", models=[*members, scratch], http_port=port,
                      logit_groups=[LogitGroupSpec(name=GROUP, models=[m.name for m in members],
                                                   num_cpus=0.5)])


@dataclass
class Result:
    method: str
    level: str
    pool_s: float | None = None
    base_s: float | None = None
    pool_score: float | None = None
    base_score: float | None = None
    pool_train_s: float = 0.0  # of pool_s: adapter training (same trainer, warm on the pool)
    base_train_s: float = 0.0
    base_timed_out: float | None = None  # the limit the baseline ran past, if it did
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.pool_s and self.base_s is not None:
            return self.base_s / self.pool_s
        return None


def method_params(cls, train_steps: int | None, overrides: dict) -> dict:
    """The method's defaults, with its training step counts capped at `train_steps`."""
    params = dict(overrides)
    if train_steps is not None:
        for name in TRAIN_STEP_FIELDS:
            field = cls.Params.model_fields.get(name)
            if field is None or name in params:
                continue
            default = field.default
            if isinstance(default, int) and default > train_steps:
                params[name] = train_steps
    return params


def make_request(name: str, cls, task, members: list[str], params: dict, tag: str):
    from moco_ray.coordinator import JobRequest

    return JobRequest(job=f"{tag}-{name}", strategy=name, params=params, task=task,
                      models=list(members), logit_group=GROUP, scratch=SCRATCH, seed=0,
                      concurrency=16)


class TrainClock:
    """Wall seconds spent in adapter training (every SFT, DPO and GRPO training of a method goes
    through `training.run_trainings`), so the table can show the sweep with and without the
    training that both sides share."""

    def __init__(self):
        from moco_ray.training import service as training

        self.seconds = 0.0
        inner = training.run_trainings

        async def clocked(*a, **kw):
            t0 = time.perf_counter()
            try:
                return await inner(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0

        training.run_trainings = clocked


async def timed(req, client, timeout_s: float, clock: TrainClock) -> tuple[float, float, float]:
    """(seconds, mean test score, training seconds) of one job: fit on dev, then every test
    example."""
    from moco_ray.coordinator import run_job

    t0, tr0 = time.perf_counter(), clock.seconds
    recs = await asyncio.wait_for(run_job(req, client), timeout_s)
    seconds = time.perf_counter() - t0
    if len(recs) != len(req.task.test):
        raise RuntimeError(f"{len(recs)} records for {len(req.task.test)} test examples")
    return seconds, sum(r.score or 0.0 for r in recs) / len(recs), clock.seconds - tr0


def _why(e: BaseException) -> str:
    """One line: the root error (a Ray task error's cause is its last 'XError: ...' line)."""
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", ln)]
    msg = causes[-1] if causes else f"{type(e).__name__}: {lines[0] if lines else ''}"
    return msg[:200]


async def sweep(args, pool_client, base_client, task, members, methods, log) -> list[Result]:
    from moco_ray.strategies.registry import list_strategies
    from moco_ray.training.launch import cold

    registry = list_strategies()
    overrides = json.loads(args.params) if args.params else {}
    clock = TrainClock()
    out: list[Result] = []
    for name in methods:
        cls = registry[name]
        res = Result(name, cls.level)
        params = method_params(cls, args.train_steps, overrides.get(name, {}))
        log(f"[{name}] params {params or '(defaults)'}")
        try:
            res.pool_s, res.pool_score, res.pool_train_s = await timed(
                make_request(name, cls, task, members, params, "pool"), pool_client,
                args.timeout, clock)
            log(f"[{name}] pool {res.pool_s:.2f}s score {res.pool_score:.3f}")
        except Exception as e:  # noqa: BLE001 - one method's failure is a row of the table
            res.note = f"pool failed: {_why(e)}"
            log(f"[{name}] {res.note}\n{traceback.format_exc(limit=4)}")
            out.append(res)
            continue
        loads0 = base_client.loads
        try:
            with cold():  # the baseline starts a training run per training, as the reference
                res.base_s, res.base_score, res.base_train_s = await timed(
                    make_request(name, cls, task, members, params, "base"), base_client,
                    args.timeout, clock)
            res.note = f"{base_client.loads - loads0} model loads"
            if res.pool_train_s or res.base_train_s:
                res.note += (f"; training {res.pool_train_s:.1f}s pool, "
                             f"{res.base_train_s:.1f}s baseline")
            log(f"[{name}] baseline {res.base_s:.2f}s score {res.base_score:.3f} "
                f"({res.note})")
        except TimeoutError:
            res.base_timed_out = args.timeout
            res.note = f"baseline ran past --timeout {args.timeout:g}s (ratio is a lower bound)"
            log(f"[{name}] {res.note}")
        except Exception as e:  # noqa: BLE001
            res.note = f"baseline skipped: {_why(e)}"
            log(f"[{name}] {res.note}\n{traceback.format_exc(limit=4)}")
        out.append(res)
    return out


def table(results: list[Result], examples: int) -> str:
    head = (f"{'method':<28}{'level':<8}{'pool s':>9}{'base s':>10}{'ratio':>8}"
            f"{'score p/b':>13}  note")
    lines = [(f"sweep over task '{TASK}' ({examples} dev + {examples} test examples), "
              "3-model pool vs load-per-call baseline"), head, "-" * len(head)]
    for r in results:
        ps = f"{r.pool_s:.2f}" if r.pool_s is not None else "-"
        bs = f"{r.base_s:.2f}" if r.base_s is not None else "-"
        ratio = f"{r.ratio:.1f}x" if r.ratio is not None else "-"
        if r.base_timed_out and r.pool_s:
            bs, ratio = f">{r.base_timed_out:.0f}", f">{r.base_timed_out / r.pool_s:.1f}x"
        sc = (f"{r.pool_score:.2f}/{r.base_score:.2f}" if r.base_score is not None
              else f"{r.pool_score:.2f}/-" if r.pool_score is not None else "-")
        lines.append(f"{r.method:<28}{r.level:<8}{ps:>9}{bs:>10}{ratio:>8}{sc:>13}  {r.note}")
    both = [r for r in results if r.ratio is not None]
    lines.append("-" * len(head))
    if both:
        tp, tb = sum(r.pool_s for r in both), sum(r.base_s for r in both)
        lines.append(f"{'TOTAL (' + str(len(both)) + ' methods run on both)':<36}{tp:>9.2f}"
                     f"{tb:>10.2f}{tb / tp:>7.1f}x")
        trp, trb = sum(r.pool_train_s for r in both), sum(r.base_train_s for r in both)
        if trp or trb:
            lines.append(f"{'TOTAL without adapter training':<36}{tp - trp:>9.2f}"
                         f"{tb - trb:>10.2f}{(tb - trb) / (tp - trp):>7.1f}x   (training: "
                         f"{trp:.1f}s pool, {trb:.1f}s baseline)")
    late = [r for r in results if r.base_timed_out and r.pool_s]
    if late:
        tp = sum(r.pool_s for r in both + late)
        tb = sum(r.base_s for r in both) + sum(r.base_timed_out for r in late)
        lines.append(f"{'TOTAL with timeouts at the limit':<36}{tp:>9.2f}{tb:>10.2f}"
                     f"{tb / tp:>7.1f}x   (a lower bound: {len(late)} baseline run(s) cut off)")
    skipped = [r for r in results if r.ratio is None and r not in late]
    if skipped:
        lines.append(f"not in the total: {', '.join(r.method for r in skipped)}")
    return "\n".join(lines)


async def warm_up(client, task, members) -> None:
    """Untimed: every kind of call once per model (plain, sampled, with top-k logprobs, scores,
    a fused decode, a scratch candidate), so first-request costs (vLLM sampler paths, imports)
    fall outside the timings on both sides."""
    from moco_ray.records import SamplingParams

    prompt = task.prompt(task.dev.examples[0])
    for lp in (None, 1, 5):
        sp = SamplingParams(max_tokens=4, temperature=0.0 if lp is None else 0.7, seed=1,
                            logprobs=lp)
        await asyncio.gather(*(client.generate(m, [prompt], sp) for m in members))
    await asyncio.gather(*(client.score(m, prompt, ["1", "2 3"]) for m in members))
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    await client.fused_generate(GROUP, [prompt], greedy, "fusion",
                                [1 / len(members)] * len(members))
    await client.generate_with(SCRATCH, await client.weights_path(members[1]), [prompt], greedy)


def _start_ray(init_ray, log, tries: int = 3) -> None:
    """A local Ray on a busy machine can miss its startup deadline: try again a few times."""
    import ray

    for k in range(tries):
        try:
            init_ray()
            return
        except Exception as e:
            if k == tries - 1:
                raise
            log(f"ray start failed ({_why(e)}); retrying")
            ray.shutdown()
            time.sleep(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma-separated registered names "
                        "(default: every registered method)")
    parser.add_argument("--examples", type=int, default=8, help="dev and test examples each")
    parser.add_argument("--quick", action="store_true",
                        help="2 examples and at most 5 training steps per method")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="cap on the methods' training steps (max_steps / train_steps)")
    parser.add_argument("--params", default="", help='JSON {"method": {param: value}} overrides')
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per method and side before it counts as failed")
    parser.add_argument("--max-trainings", type=int, default=1,
                        help="adapter trainings (Ray Train runs) at once, as a sweep's "
                        "max_trainings; a method's adapters share its runs, training in turn "
                        "(default 1: one trainer beside the pool on a 2-core node; 0: no cap, "
                        "one run per adapter, all at once)")
    parser.add_argument("--cold-trainers", action="store_true",
                        help="the pool side too starts a Ray Train run per training (default: "
                        "it keeps warm trainers, as a sweep with warm_trainers: true; the "
                        "baseline always starts a run per training)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.examples = min(args.examples, 2)
        args.train_steps = min(args.train_steps or 5, 5)
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    if args.max_trainings < 0:
        parser.error("--max-trainings must be >= 0")

    import torch
    from bench_baseline import ReloadPerCallClient

    from moco_ray import models
    from moco_ray.pool.pool import ModelPool
    from moco_ray.strategies.registry import list_strategies
    from moco_ray.tasks.synthetic import make_synthetic
    from moco_ray.training import launch
    from moco_ray.training import service as training
    from moco_ray.workflows.runtime import init_ray

    registry = list_strategies()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or list(registry)
    unknown = [m for m in methods if m not in registry]
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {', '.join(registry)}")
    # The pool's replicas run one torch/OpenMP thread each; the baseline gets the same.
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    training.limit_trainings(args.max_trainings or None)  # both sides
    launch.keep_warm(not args.cold_trainers)  # the baseline's trainings run in launch.cold()
    task = make_synthetic(TASK, n_dev=args.examples, n_test=args.examples)
    cfg = pool_config()
    members = [m.name for m in cfg.members]
    t0 = time.perf_counter()
    _start_ray(init_ray, log)
    with ModelPool(cfg, seed=0) as pool:
        log(f"pool up in {time.perf_counter() - t0:.1f}s: {pool.models} + group {GROUP} + "
            f"{SCRATCH}")
        base = ReloadPerCallClient(
            {m.name: models.resolve_path(m.path) for m in cfg.members},
            groups={g.name: list(g.models) for g in cfg.logit_groups},
            scratch={m.name: models.resolve_path(m.path) for m in cfg.scratch})

        async def go():
            client = pool.client()
            for c in (client, base):
                await warm_up(c, task, members)
            return await sweep(args, client, base, task, members, methods, log)

        results = asyncio.run(go())
    print(table(results, args.examples))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "ratio": r.ratio} for r in results], f, indent=1)
    return 0


if __name__ == "__main__":  # vLLM spawns processes: this guard is required
    sys.exit(main())
