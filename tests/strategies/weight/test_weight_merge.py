"""Weight-level strategies without engines: the merge math on small tensors, the search logic
(greedy soup, PSO, ExPO's alpha, LoraHub's CMA-ES) with fake objectives, and whole fit/solve
runs over a fake pool whose 'scratch' reads each candidate's safetensors and answers as well as
its weights deserve."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moco_ray.records import Generation
from moco_ray.strategies.base import StrategyContext
from moco_ray.strategies.registry import get_strategy
from moco_ray.strategies.weight import _merge as M
from moco_ray.strategies.weight.expo import choose_alpha, endpoints
from moco_ray.strategies.weight.greedy_soup import greedy_soup
from moco_ray.strategies.weight.lorahub import CMAES, lorahub_search
from moco_ray.strategies.weight.model_swarms import (
    SwarmSettings,
    WeightSwarm,
    partner_velocities,
)
from moco_ray.tasks.base import DevSplit, Example, Task, TestSplit


def run(coro):
    return asyncio.run(coro)


# --- merge math ----------------------------------------------------------------------------------

def test_dare_keeps_density_share_rescaled_and_preserves_the_expectation():
    t = torch.full((200_000,), 3.0)
    out = M.dare(t, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.tensor(3.0 / 0.3))  # kept entries rescaled by 1/p
    assert abs(out.mean().item() - 3.0) < 0.05  # E[dare(t)] = t
    assert M.dare(t, 1.0) is t
    with pytest.raises(ValueError, match="density"):
        M.dare(t, 0.0)


def test_trim_keeps_the_largest_magnitudes():
    t = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0, 0.0])
    assert M.trim(t, 0.5).tolist() == [0.0, -5.0, 2.0, 0.0, 4.0, 0.0]
    assert M.trim(t, 1.0) is t


def test_ties_elects_the_sign_of_the_weighted_sum_and_averages_the_agreeing_deltas():
    d1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    d2 = torch.tensor([2.0, 2.0, -4.0, 0.0])
    d3 = torch.tensor([-1.0, 0.0, -1.0, 5.0])
    out = M.ties_combine([d1, d2, d3], [1.0, 1.0, 1.0])
    # sums 2, 0, -2, 5 -> signs +, none, -, +; agreeing means 1.5, 0, -2.5, 5
    assert out.tolist() == [1.5, 0.0, -2.5, 5.0]
    out = M.ties_combine([d1, d2, d3], [1.0, 2.0, 1.0])
    # entry 0: +; (1*1 + 2*2) / (1 + 2); entry 1: -2 + 4 > 0 -> only d2 agrees -> 2
    assert out[0].item() == pytest.approx(5 / 3) and out[1].item() == pytest.approx(2.0)


def test_dare_ties_is_base_plus_the_ties_merge_and_is_seeded():
    base = {"a": torch.zeros(4), "n": torch.tensor([7])}
    s1 = {"a": torch.tensor([1.0, -2.0, 3.0, 0.0]), "n": torch.tensor([7])}
    s2 = {"a": torch.tensor([2.0, 2.0, -4.0, 0.0]), "n": torch.tensor([7])}
    out = M.dare_ties({"a": base["a"] + 1, "n": base["n"]},
                      [{"a": s1["a"] + 1, "n": s1["n"]}, {"a": s2["a"] + 1, "n": s2["n"]}],
                      [0.5, 0.5])
    assert out["a"].tolist() == [2.5, 1.0, -3.0, 1.0]  # 1 + [1.5, 0 (tie), -4 (d2 wins), 0]
    assert out["n"].tolist() == [7]  # integer tensors pass through
    big = [{"a": torch.randn(1000)} for _ in range(2)]
    zero = {"a": torch.zeros(1000)}
    a = M.dare_ties(zero, big, [0.5, 0.5], density=0.5, seed=3)["a"]
    b = M.dare_ties(zero, big, [0.5, 0.5], density=0.5, seed=3)["a"]
    c = M.dare_ties(zero, big, [0.5, 0.5], density=0.5, seed=4)["a"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_soup_linear_and_extrapolation():
    x = {"w": torch.tensor([1.0, 2.0]), "i": torch.tensor([1, 2])}
    y = {"w": torch.tensor([3.0, 6.0]), "i": torch.tensor([1, 2])}
    assert M.uniform_soup([x, y])["w"].tolist() == [2.0, 4.0]
    assert M.linear([x, y], [0.25, 0.75])["w"].tolist() == [2.5, 5.0]
    assert M.uniform_soup([x, y])["i"].dtype == torch.int64
    # theta1 + alpha (theta1 - theta0)
    assert M.extrapolate(y, x, 0.5)["w"].tolist() == [4.0, 8.0]
    assert M.extrapolate(y, x, 0.0)["w"].tolist() == [3.0, 6.0]
    assert M.add(x, M.delta(y, x), 1.0)["w"].tolist() == [3.0, 6.0]


def _model_dir(path: Path, tensors: dict, manifest: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    (path / "tokenizer.json").write_text("{}")
    save_file(tensors, str(path / "model.safetensors"))
    if manifest:
        (path / "moco_checkpoint.json").write_text("{}")
    return path


def test_a_candidate_copies_config_and_tokenizer_and_keeps_dtypes(tmp_path):
    src = _model_dir(tmp_path / "m", {"w": torch.ones(3, dtype=torch.bfloat16)}, manifest=True)
    w = M.WeightsDir(src)
    assert w.dtypes == {"w": torch.bfloat16} and w.shapes == {"w": (3,)}
    out = M.Output(tmp_path / "cand", w.dtypes, src)
    [path] = M.stream_merge([w], lambda name, ts: ts[0] * 2.5, [out])
    files = sorted(p.name for p in Path(path).iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]  # no stale manifest
    saved = load_file(str(Path(path) / "model.safetensors"))["w"]
    assert saved.dtype == torch.bfloat16 and saved.float().tolist() == [2.5] * 3
    with pytest.raises(FileExistsError, match="fresh dir"):
        M.stream_merge([w], lambda name, ts: ts[0], [out])


def test_architecture_mismatch_names_the_tensors():
    M.check_same_architecture({"a": {"x": (2, 3)}, "b": {"x": (2, 3)}})
    with pytest.raises(ValueError, match=r"'x' is \[4, 3\] in 'b'.*lacks 1 tensor"):
        M.check_same_architecture({"a": {"x": (2, 3)}, "b": {"x": (4, 3)}, "c": {}})


# --- search logic with fake objectives ----------------------------------------------------------

def test_greedy_soup_goes_best_first_and_keeps_members_that_do_not_hurt():
    table = {("A",): 0.5, ("B",): 0.9, ("C",): 0.7, ("D",): 0.2,
             ("B", "C"): 0.9,  # equal: kept (the score does not drop)
             ("B", "C", "A"): 0.85,  # drops: A rejected
             ("B", "C", "D"): 0.95}
    calls = []

    async def evaluate(ing):
        calls.append(tuple(ing))
        return table[tuple(ing)]

    out = run(greedy_soup(["A", "B", "C", "D"], evaluate))
    assert out["order"] == ["B", "C", "A", "D"]
    assert out["ingredients"] == ["B", "C", "D"] and out["score"] == 0.95
    assert calls[4:] == [("B", "C"), ("B", "C", "A"), ("B", "C", "D")]
    assert [t["accepted"] for t in out["tried"]] == [True, False, True]


def _vec(*xs):
    return {"w": torch.tensor(xs, dtype=torch.float32)}


def test_pso_update_follows_the_model_swarms_rule():
    s = SwarmSettings(weight_randomness=False, step_length=0.5, step_length_factor=0.5,
                      minimum_step_length=0.2)
    x = [_vec(0.0), _vec(1.0), _vec(4.0)]
    v = [_vec(1.0), _vec(0.0), _vec(-1.0)]
    sw = WeightSwarm(list(x), list(v), s, random.Random(0))
    assert sw.update([0.1, 0.5, 0.3], tags=["a", "b", "c"]) is False
    assert sw.global_best_tag == "b" and sw.global_best_score == 0.5
    assert sw.global_worst_score == 0.1
    tot = 0.2 + 0.3 + 0.4 + 0.05
    wv, wp, wg, wr = 0.2 / tot, 0.3 / tot, 0.4 / tot, 0.05 / tot
    for i in range(3):
        xi, vi = x[i]["w"].item(), v[i]["w"].item()
        want_v = wv * vi + wp * (xi - xi) + wg * (1.0 - xi) + wr * (xi - 0.0)
        assert sw.velocities[i]["w"].item() == pytest.approx(want_v, abs=1e-6)
        assert sw.positions[i]["w"].item() == pytest.approx(xi + 0.5 * want_v, abs=1e-6)
    assert sw.step == pytest.approx(0.25)
    sw.update([0.0, 0.0, 0.0])
    assert sw.step == pytest.approx(0.2)  # floored at the minimum


def test_pso_restarts_a_stalled_particle_from_its_best_and_stops_on_patience():
    s = SwarmSettings(weight_randomness=False, restart_patience=2, patience=3)
    sw = WeightSwarm([_vec(0.0), _vec(1.0)], [_vec(0.5), _vec(0.5)], s, random.Random(0))
    sw.update([0.9, 0.1])
    best0 = sw.personal_best[0]
    sw.update([0.5, 0.2])
    # particle 0: history 0.9, 0.5 -> not yet (needs > restart_patience values)
    assert sw.restarts == 0
    assert sw.update([0.4, 0.3]) is False  # particle 0: 0.4 <= 0.5 two back -> restart
    assert sw.restarts == 1 and sw.restart_counter[0] == 3
    # restarted: velocity zeroed, then one move towards the bests (particle 0 holds both)
    assert sw.velocities[0]["w"].item() == pytest.approx(
        (0.05 / 0.95) * (best0["w"].item() - sw.global_worst["w"].item()), abs=1e-6)
    # the global best (0.9) has not improved on the one 3 iterations back: stop
    assert sw.update([0.1, 0.1]) is True


def test_pso_search_beats_every_starting_member_on_a_smooth_objective():
    target = torch.tensor([0.6, -0.2])

    def utility(x):
        return -float(((x["w"] - target) ** 2).sum())

    found = []
    for seed in range(5):
        rng = random.Random(seed)
        pos = [_vec(0.0, 0.0), _vec(1.0, 0.0), _vec(0.0, -1.0), _vec(1.0, 1.0)]
        start_best = max(utility(p) for p in pos)
        sw = WeightSwarm(pos, partner_velocities(pos, rng), SwarmSettings(), rng)
        for _ in range(15):
            if sw.update([utility(p) for p in sw.positions]):
                break
        found.append(sw.global_best_score - start_best)
    # the best member is 0.2 away (utility -0.2); the swarm gets much closer on average
    assert np.mean(found) > 0.1 and min(found) >= 0.0


def test_expo_endpoints_and_alpha_choice():
    scores = {"a": 0.4, "b": 0.9, "c": 0.1, "d": 0.4}
    assert endpoints(scores, "worst_to_best") == (["c"], ["b"])
    assert endpoints(scores, "topk_bottomk", 2) == (["d", "c"], ["b", "a"])
    with pytest.raises(ValueError, match="params.k=3"):
        endpoints(scores, "topk_bottomk", 3)
    table = {0.1: 0.5, 0.2: 0.8, 0.3: 0.8, 0.5: 0.6}
    seen = []

    async def evaluate(a):
        seen.append(a)
        return table[a]

    alpha, s = run(choose_alpha([0.5, 0.3, 0.2, 0.1, 0.2], evaluate))
    assert alpha == 0.2 and s == [0.5, 0.8, 0.8, 0.6] and seen == [0.1, 0.2, 0.3, 0.5]


def test_cmaes_converges_on_a_quadratic():
    target = np.array([0.8, -0.4, 0.3])
    es = CMAES(np.zeros(3), 0.5, -1.5, 1.5, np.random.default_rng(0))
    for _ in range(60):
        xs = es.ask()
        es.tell(xs, [float(((x - target) ** 2).sum()) for x in xs])
    assert np.linalg.norm(es.mean - target) < 1e-3


def test_lorahub_search_starts_at_zero_respects_budget_and_bounds_and_finds_the_optimum():
    target = [1.0, -0.5]

    async def evaluate(w):  # a dev score peaking at `target`
        return 1.0 - 0.5 * sum((a - b) ** 2 for a, b in zip(w, target))

    out = run(lorahub_search(2, evaluate, budget=80, bound=1.5, regular_coef=0.0,
                             rng=np.random.default_rng(0)))
    assert out["tried"][0]["w"] == [0.0, 0.0] and len(out["tried"]) == 80
    assert all(abs(v) <= 1.5 for t in out["tried"] for v in t["w"])
    assert np.linalg.norm(np.array(out["w"]) - target) < 0.1
    # the L1 penalty pulls towards 0: with a flat score, w = 0 (the first point) wins
    out = run(lorahub_search(2, lambda w: asyncio.sleep(0, 0.5), budget=9, bound=1.5,
                             regular_coef=0.05, rng=np.random.default_rng(0)))
    assert out["w"] == [0.0, 0.0] and len(out["tried"]) == 9


# --- whole strategies over a fake weights-reading pool ---------------------------------------------

class WeightPool:
    """Members serve fixed dirs; the scratch reads each candidate's tensor 'w' (a vector) and
    answers the first round(n * quality(w)) dev/test questions right, where quality peaks at
    `best` and falls with distance. Records every weights dir the scratch served."""

    def __init__(self, dirs: dict[str, str], best: list[float], n: int):
        self.models = list(dirs)
        self.dirs = dirs
        self.best = torch.tensor(best)
        self.n = n
        self.served: list[str] = []
        self.params: list = []  # the SamplingParams of every scratch call

    async def weights_path(self, model):
        return self.dirs[model]

    def quality(self, w: torch.Tensor) -> float:
        return max(0.0, 1.0 - float((w - self.best).norm()))

    async def generate_with(self, scratch, weights, prompts, params):
        assert scratch == "scratch"
        self.served.append(weights)
        self.params.append(params)
        w = M.WeightsDir(weights).read("w").float()
        out = []
        for p in prompts:
            k = int(p[0]["content"].split()[-1])
            ok = k < round(self.n * self.quality(w))
            out.append(Generation(text="7" if ok else "0", token_ids=[1], prompt_tokens=1,
                                  completion_tokens=1, model=scratch, version=len(self.served)))
        return out


def _task(n: int) -> Task:
    def rows(prefix):
        return tuple(Example(id=f"{prefix}{i}", question=f"q {i}", reference="7")
                     for i in range(n))

    return Task(name="toy", kind="exact_match", dev=DevSplit(task="toy", examples=rows("d")),
                test=TestSplit(task="toy", examples=rows("t")),
                format=lambda ex: [{"role": "user", "content": ex.question}],
                extract=lambda out, ex: out.strip(),
                metric=lambda ans, ex: float(ans == ex.reference), max_tokens=4)


@pytest.fixture
def weight_job(tmp_path):
    """weight_job(vectors, best) -> (ctx, pool): members m0.. with tensor 'w' = each vector."""

    builds = iter(range(100))

    def build(vectors, best, n=20, seed=0):
        root = tmp_path / f"job{next(builds)}"
        dirs = {f"m{i}": str(_model_dir(root / f"m{i}", {"w": torch.tensor(v)}))
                for i, v in enumerate(vectors)}
        pool = WeightPool(dirs, best, n)
        ctx = StrategyContext(pool, _task(n), list(dirs), seed=seed, scratch="scratch",
                              workdir=str(root / "work"))
        return ctx, pool

    return build


def _fit_and_solve(name, params, ctx):
    strat = get_strategy(name)({"temperature": 0.0, **params})

    async def go():
        await strat.fit_checked(ctx, ctx.task.dev)
        return [r async for r in strat.run(ctx, ctx.task.test)]

    return strat, run(go())


def _served_w(path) -> list[float]:
    return M.WeightsDir(path).read("w").tolist()


def test_greedy_soup_strategy_averages_the_members_that_help(weight_job):
    # best = 0.5: m0 (0.1) is 0.4 away, m1 (0.9) 0.4 away, m2 (3.0) far; the soup of m0, m1
    # sits on the optimum, adding m2 would drag it off
    ctx, _pool = weight_job([[0.1], [0.9], [3.0]], best=[0.5])
    strat, recs = _fit_and_solve("weight_greedy_soup", {}, ctx)
    assert strat.fitted["ingredients"] == ["m0", "m1"]
    assert strat.fitted["dev_score"] == 1.0
    assert _served_w(strat.fitted["weights"]) == pytest.approx([0.5])
    assert [r.score for r in recs] == [1.0] * 20
    assert all(t.model == "scratch" and t.step == "answer" for r in recs for t in r.trace)
    # only the chosen candidate dir survives fit
    left = [p for p in Path(ctx.workdir, "weight_greedy_soup").iterdir()]
    assert [str(p) for p in left] == [strat.fitted["weights"]]


def test_dare_ties_average_and_optimized(weight_job):
    ctx, _ = weight_job([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], best=[0.5, 0.5])
    strat, recs = _fit_and_solve("weight_dare_ties", {"base": "m0"}, ctx)
    # base m0 = 0: deltas (1,0), (0,1) never conflict, each entry keeps its own delta
    assert _served_w(strat.fitted["weights"]) == pytest.approx([1.0, 1.0])
    assert strat.fitted["merge_weights"] == pytest.approx({"m0": 1 / 3, "m1": 1 / 3,
                                                            "m2": 1 / 3})
    ctx, _pool = weight_job([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], best=[0.5, 0.5])
    strat, recs = _fit_and_solve("weight_dare_ties", {
        "base": "m0", "mode": "optimized", "trim_density": 0.5, "population": 3,
        "max_iterations": 2}, ctx)
    scores = [s for it in strat.fitted["scores"] for s in it]
    assert len(scores) == 6 and strat.fitted["dev_score"] == max(scores)
    assert sum(strat.fitted["merge_weights"].values()) == pytest.approx(1.0)
    assert recs[0].meta["weights"] == strat.fitted["weights"]


def test_model_swarms_strategy_starts_from_the_members_and_keeps_the_global_best(weight_job):
    ctx, pool = weight_job([[0.0], [1.0], [2.0]], best=[0.55], seed=1)
    strat, recs = _fit_and_solve("weight_model_swarms", {"max_iterations": 4}, ctx)
    members = [pool.dirs[m] for m in ("m0", "m1", "m2")]
    assert pool.served[:3 * 20] == [d for d in members for _ in range(20)]
    first = strat.fitted["scores"][0]
    assert first == pytest.approx([0.45, 0.55, 0.0], abs=0.05)
    assert strat.fitted["dev_score"] == max(max(s) for s in strat.fitted["scores"])
    assert strat.fitted["dev_score"] > 0.55  # moved past the best member
    assert recs[0].meta["weights"] == strat.fitted["weights"]


def test_expo_extrapolates_from_the_worst_to_the_best_member(weight_job):
    # worst m1 at 0, best m0 at 1, optimum at 1.3: theta = 1 + alpha (1 - 0), alpha 0.3 best
    ctx, _pool = weight_job([[1.0], [0.0], [0.5]], best=[1.3])
    strat, _recs = _fit_and_solve("weight_expo", {}, ctx)
    assert strat.fitted["source"] == ["m1"] and strat.fitted["target"] == ["m0"]
    assert strat.fitted["alpha"] == pytest.approx(0.3)
    assert _served_w(strat.fitted["weights"]) == pytest.approx([1.3])
    strat, _ = _fit_and_solve("weight_expo", {"mode": "pair", "source": "m2", "target": "m0",
                                              "alpha_mode": "fixed", "alpha": 0.6}, ctx)
    assert _served_w(strat.fitted["weights"]) == pytest.approx([1.3])
    with pytest.raises(ValueError, match="source and target"):
        get_strategy("weight_expo")({"mode": "pair", "source": "m0", "target": "m0"})


def test_lorahub_strategy_finds_coefficients_of_the_member_deltas(weight_job):
    # base m0 = (0, 0); modules m1 = (1, 0), m2 = (0, 1); optimum (0.8, -0.4) = 0.8 d1 - 0.4 d2
    ctx, _pool = weight_job([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], best=[0.8, -0.4], n=50)
    strat, _recs = _fit_and_solve("weight_lorahub", {"max_inference_step": 60,
                                                    "lorahub_dev_samples": 50}, ctx)
    c = strat.fitted["coefficients"]
    assert set(c) == {"m1", "m2"} and strat.fitted["base"] == "m0"
    assert c["m1"] == pytest.approx(0.8, abs=0.15) and c["m2"] == pytest.approx(-0.4, abs=0.15)
    assert strat.fitted["dev_score"] >= 0.85
    assert len(strat.fitted["candidates"]) == 60


SMALL = {"weight_greedy_soup": {}, "weight_expo": {"alpha_candidates": [0.1]},
         "weight_dare_ties": {"base": "m0"}, "weight_model_swarms": {"max_iterations": 2},
         "weight_lorahub": {"max_inference_step": 2, "lorahub_dev_samples": 4}}


@pytest.mark.parametrize("name", list(SMALL))
def test_candidates_are_scored_greedily_whatever_the_job_temperature(weight_job, name):
    ctx, pool = weight_job([[0.1], [0.9], [3.0]], best=[0.5], n=4)
    _, recs = _fit_and_solve(name, {"temperature": 0.7, **SMALL[name]}, ctx)
    fit = pool.params[:len(pool.params) - len(recs)]  # every dev pass scoring a candidate
    answer = pool.params[len(fit):]
    assert fit and all(p.temperature == 0.0 and p.seed is None for p in fit)
    # test answers keep the job's sampling, seeded per example
    assert len(answer) == 4 and all(p.temperature == 0.7 and p.seed is not None
                                    for p in answer)
    assert all(t.step == "answer" for r in recs for t in r.trace)


def test_scoring_params_are_greedy_with_the_job_max_tokens():
    task = _task(2)
    params = get_strategy("weight_expo").Params(temperature=1.2, top_p=0.5)
    sp = M.scoring_params(params, task)
    assert (sp.temperature, sp.seed, sp.max_tokens) == (0.0, None, task.max_tokens)
    assert M.scoring_params(params.model_copy(update={"max_tokens": 9}), task).max_tokens == 9


def test_weight_strategies_need_a_scratch_and_one_architecture(weight_job, tmp_path):
    ctx, _ = weight_job([[0.0], [1.0]], best=[0.5])
    ctx.scratch = None
    for name in ("weight_greedy_soup", "weight_dare_ties", "weight_model_swarms",
                 "weight_lorahub", "weight_expo"):
        assert get_strategy(name).needs_scratch
        with pytest.raises(ValueError, match="role: scratch"):
            _fit_and_solve(name, {}, ctx)
    ctx, _pool = weight_job([[0.0], [1.0, 2.0]], best=[0.5])
    with pytest.raises(ValueError, match="one architecture"):
        _fit_and_solve("weight_greedy_soup", {}, ctx)
    with pytest.raises(RuntimeError, match="fit"):
        run(get_strategy("weight_expo")().solve(ctx.example(ctx.task.test.examples[0]),
                                                ctx.task.test.examples[0]))


def test_bad_params_are_refused_with_the_field_named():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lorahub_dev_samples"):
        get_strategy("weight_lorahub")({"dev_size": 3})
    with pytest.raises(ValidationError, match="density"):
        get_strategy("weight_dare_ties")({"density": 0.0})
    with pytest.raises(ValidationError, match="mode"):
        get_strategy("weight_dare_ties")({"mode": "best"})
    with pytest.raises(ValidationError, match="alpha_candidates"):
        get_strategy("weight_expo")({"alpha_candidates": []})
