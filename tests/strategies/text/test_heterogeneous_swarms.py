import asyncio
import random
import re

import numpy as np
import pytest

from moco_ray.strategies.text._graph import decode_dag, parents, waves
from moco_ray.strategies.text._pso import ParticleSwarm, SwarmSettings
from moco_ray.strategies.text.heterogeneous_swarms import HeterogeneousSwarms

CHAIN = [[0, 1, 0], [0, 0, 1], [0, 0, 0]]  # a -> b -> c: the graph the scripted pool rewards


def graph_respond(call):
    """Every node writes the graph it has seen: 'b(a())' is b after reading a. The sink (asked
    for a final answer) is right on the first k dev examples, k = how many of: the sink is c,
    b feeds c, a feeds b. Only the chain a -> b -> c gets all three."""
    seen = sorted(re.findall(r"^\[\d+\] (\S+)$", call.text, flags=re.MULTILINE))
    full = f"{call.model}({','.join(seen)})"
    if "final answer" not in call.text:
        return full
    k = (call.model == "c") + any(s.startswith("b(") for s in seen) + ("b(a(" in full)
    return f"{full} Answer: {'7' if int(call.qid[1:]) < k else '0'}"


def fit(toy, seed, **params):
    ctx, pool = toy(["a", "b", "c"], graph_respond, n_dev=3, n_test=2, seed=seed)
    strat = HeterogeneousSwarms({"dev_fraction": 1.0, **params})
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    return strat, ctx, pool


def test_swarm_search_finds_the_best_graph_from_a_worse_initial_swarm(toy):
    starts = []
    for seed in range(6):
        strat, ctx, pool = fit(toy, seed)  # reference defaults: 5 particles x 5 iterations
        f = strat.fitted
        starts.append(f["initial_best"])
        assert f["dev_score"] == 1.0 and f["dag"] == CHAIN and f["sink"] == "c"
        assert f["dev_score"] == max(map(max, f["dev_scores"]))
        assert len(f["dev_scores"]) == 5 and all(len(r) == 5 for r in f["dev_scores"])
        assert all(c.qid.startswith("d") for c in pool.calls)  # tuned on dev only
        # test time runs the graph that earned the best dev score
        pool.calls.clear()
        ex = ctx.task.test.examples[0]
        ans = asyncio.run(strat.solve(ctx.example(ex), ex))
        assert ans.output.startswith("c(b(a()))") and ans.meta["dag"] == CHAIN
    assert sum(s < 1.0 for s in starts) >= 4  # mostly the initial swarm lacked the best graph


def test_dag_runs_in_topological_order_and_each_node_sees_only_its_parents(toy):
    # a -> c, b -> c, c -> d: d is the sink
    dag = [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    ctx, pool = toy(["a", "b", "c", "d"], graph_respond)
    ex = ctx.task.test.examples[0]
    out, answers = asyncio.run(HeterogeneousSwarms()._run(ctx.example(ex), ex, dag))
    order = [c.model for c in pool.calls]
    assert set(order[:2]) == {"a", "b"} and order[2:] == ["c", "d"]
    a, b, c, d = (pool.of(m)[0] for m in "abcd")
    assert a.text == b.text == f"{a.prompt[0]['content']}\nQuestion t0"  # sources: task prompt
    assert re.findall(r"^\[\d\] (\S+)$", c.text, re.MULTILINE) == ["a()", "b()"]
    assert "final answer" not in c.text and "final answer" in d.text  # only the sink concludes
    assert re.findall(r"^\[\d\] (\S+)$", d.text, re.MULTILINE) == ["c(a(),b())"]
    assert out == "d(c(a(),b())) Answer: 0" and answers["c"] == "c(a(),b())"


def test_graph_decoding_gives_an_in_tree_into_one_sink():
    w = [[0.0, 0.9, 0.1], [0.6, 0.0, 0.1], [0.1, 0.1, 0.0]]
    # argmax decoding: c has the lowest out-degree -> sink; a (highest) links to c; b then
    # links to its heavier placed target, a
    assert decode_dag(w, 0.0, random.Random(0)) == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]
    rng = random.Random(1)
    seen = set()
    for _ in range(200):
        n = rng.randint(2, 6)
        m = [[rng.uniform(-1, 1) for _ in range(n)] for _ in range(n)]
        dag = decode_dag(m, 0.7, rng)
        sinks = [j for j in range(n) if not any(dag[j])]
        assert len(sinks) == 1 and all(sum(dag[i]) == 1 for i in range(n) if i != sinks[0])
        assert sum(map(len, waves(dag))) == n  # acyclic
        assert waves(dag)[-1] == sinks
        if n == 3:
            seen.add(str(dag))
    assert len(seen) == 9  # top-p sampling reaches every in-tree on three nodes
    with pytest.raises(ValueError, match="cycle"):
        waves([[0, 1], [1, 0]])
    assert parents(CHAIN, 2) == [1]


def test_particle_update_follows_the_reference_rule():
    s = SwarmSettings(population=2, weight_randomness=False)
    sw = ParticleSwarm(1, s, np.random.default_rng(0))
    sw.x, sw.v = np.array([[0.0], [1.0]]), np.array([[1.0], [0.0]])
    assert sw.update([1.0, 2.0]) is False
    wsum = s.inertia + s.cognitive_coeff + s.social_coeff + s.repel_coeff
    # particle 0: inertia keeps v = 1, the social pull goes to the best (x = 1)
    v0 = (s.inertia * 1.0 + s.social_coeff * 1.0) / wsum
    # particle 1 is the best; only the push away from the worst (x = 0) moves it
    v1 = s.repel_coeff * 1.0 / wsum
    assert sw.v[:, 0] == pytest.approx([v0, v1])
    assert sw.x[:, 0] == pytest.approx([0.5 * v0, 1.0 + 0.5 * v1])
    assert sw.step == pytest.approx(0.5 * 0.95)


def test_stalled_particles_restart_and_a_stalled_swarm_stops():
    s = SwarmSettings(population=2, patience=3, restart_patience=2)
    sw = ParticleSwarm(3, s, np.random.default_rng(0))
    start1 = sw.particles()[1]
    assert not sw.update([5.0, 1.0])
    assert not sw.update([6.0, 1.0])
    assert not np.allclose(sw.x[1], start1)  # moved
    assert not sw.update([7.0, 1.0])  # particle 1 stalled: back to its best, the start
    assert sw.x[1] == pytest.approx(start1) and sw.p_best_score[1] == 1.0
    assert not np.allclose(sw.x[0], sw.p_best[0])  # the improving particle moved on
    assert sw.update([7.0, 2.0])  # the global best has not improved for patience - 1 steps


def test_swarm_improves_a_smooth_objective():
    target = np.random.default_rng(7).uniform(-1, 1, 9)
    sw = ParticleSwarm(9, SwarmSettings(population=10, patience=100),
                       np.random.default_rng(0))

    def scores():
        return [-float(((x - target) ** 2).sum()) for x in sw.particles()]

    first = max(scores())
    for _ in range(40):
        sw.update(scores())
    assert sw.g_best_score > first / 2  # at least halves the squared distance
