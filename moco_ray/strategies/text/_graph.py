"""Graphs over the job's models for the topology strategies (text_structure,
text_heterogeneous_swarms). Adjacency matrices are lists of rows; adj[i][j] = 1 is an edge
i -> j: model j reads model i's answer.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

Topology = Literal["chain", "tree", "star", "wheel", "circle", "complete", "custom"]


def topology(kind: Topology, n: int, custom: Sequence[Sequence[int]] | None = None
             ) -> list[list[int]]:
    """The adjacency of a named topology over n models (all but 'custom' are undirected).

    chain: a path 0-1-...-(n-1); tree: the binary heap (i linked to 2i+1 and 2i+2); star: hub 0
    linked to every other model; wheel: a star whose spokes are also linked in a ring (what the
    MoCo reference calls 'star'); circle: a ring; complete: everyone with everyone; custom: the
    given n x n 0/1 matrix, directed, row = sender.
    """
    adj = [[0] * n for _ in range(n)]

    def link(i: int, j: int) -> None:
        if i != j:
            adj[i][j] = adj[j][i] = 1

    if kind == "custom":
        if custom is None:
            raise ValueError("structure='custom' needs params.adjacency (an n x n 0/1 matrix)")
        if len(custom) != n or any(len(row) != n for row in custom):
            raise ValueError(f"params.adjacency must be {n} x {n} for the job's {n} models, "
                             f"got {len(custom)} rows of lengths {[len(r) for r in custom]}")
        return [list(map(int, row)) for row in custom]
    for i in range(n):
        if kind == "chain" and i + 1 < n:
            link(i, i + 1)
        elif kind == "tree":
            for c in (2 * i + 1, 2 * i + 2):
                if c < n:
                    link(i, c)
        elif kind in ("star", "wheel") and i > 0:
            link(0, i)
            if kind == "wheel" and n > 2:
                link(i, i % (n - 1) + 1)  # ring over the spokes 1..n-1
        elif kind == "circle":
            link(i, (i + 1) % n)
        elif kind == "complete":
            for j in range(n):
                link(i, j)
    return adj


def parents(adj: Sequence[Sequence[float]], j: int) -> list[int]:
    """The nodes whose answers node j reads, in index order."""
    return [i for i in range(len(adj)) if adj[i][j]]


def waves(adj: Sequence[Sequence[int]]) -> list[list[int]]:
    """Topological order of a DAG in waves: each wave's nodes depend only on earlier waves, so
    they can run at once. Raises on a cycle."""
    n = len(adj)
    indeg = [len(parents(adj, j)) for j in range(n)]
    done: set[int] = set()
    out: list[list[int]] = []
    while len(done) < n:
        wave = [j for j in range(n) if j not in done and indeg[j] == 0]
        if not wave:
            raise ValueError(f"graph has a cycle among nodes {sorted(set(range(n)) - done)}")
        for i in wave:
            done.add(i)
            for j in range(n):
                if adj[i][j]:
                    indeg[j] -= 1
        out.append(wave)
    return out


def decode_dag(weights: Sequence[Sequence[float]], top_p: float, rng: random.Random
               ) -> list[list[int]]:
    """Sample a DAG from a continuous n x n matrix (Heterogeneous Swarms' graph decoding).

    Out-degree = row sum (diagonal ignored). The sink is drawn first, favouring low out-degree;
    then, repeatedly, a remaining node is drawn favouring high out-degree and linked to one
    already placed node, drawn by its edge weights. Each draw is a softmax restricted to a top-p
    nucleus (top_p = 0: argmax). The result is an in-tree: every node but the sink has exactly
    one out-edge, all paths end at the sink.
    The reference scores the sink by 1/out-degree, which inverts the order for negative degrees;
    -out-degree keeps "low out-degree first" for every sign.
    """
    n = len(weights)
    w = [[0.0 if i == j else float(weights[i][j]) for j in range(n)] for i in range(n)]
    out_deg = [sum(row) for row in w]
    dag = [[0] * n for _ in range(n)]
    placed = [_nucleus(list(range(n)), [-d for d in out_deg], top_p, rng)]
    remaining = [i for i in range(n) if i != placed[0]]
    while remaining:
        node = _nucleus(remaining, [out_deg[i] for i in remaining], top_p, rng)
        target = _nucleus(placed, [w[node][j] for j in placed], top_p, rng)
        dag[node][target] = 1
        placed.append(node)
        remaining.remove(node)
    return dag


def _nucleus(items: list[int], logits: list[float], top_p: float, rng: random.Random) -> int:
    """Draw from softmax(logits) within its top-p nucleus (always at least the top item)."""
    top = max(logits)
    probs = [math.exp(x - top) for x in logits]
    total = sum(probs)
    ranked = sorted(zip(probs, items), key=lambda t: -t[0])  # stable: index order on ties
    kept, mass = [], 0.0
    for pr, item in ranked:
        kept.append((pr, item))
        mass += pr / total
        if mass > top_p:
            break
    if len(kept) == 1:
        return kept[0][1]
    return rng.choices([i for _, i in kept], weights=[pr for pr, _ in kept])[0]
