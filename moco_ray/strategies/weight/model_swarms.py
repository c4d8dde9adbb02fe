"""Model Swarms: the members are particles in weight space that move, by particle swarm
optimisation with dev score as utility, towards weights better than any of them. Model Swarms
(Feng et al., 2024); MoCo `weight_model_swarms.py` and its `utils/swarm.py`.

One particle per member. Its position x starts at the member's weights, its velocity at the
difference to another random member (the reference's "random" start), its personal best p at x.
Each iteration scores every particle on dev (through the scratch), updates p, the global best g
and the global worst w, then moves each particle:

    v <- r_v*inertia*v + r_p*c_cog*(p - x) + r_g*c_soc*(g - x) + r_w*c_rep*(x - w)
         (the four coefficients normalised to sum 1, r_* ~ U(0, 1) unless weight_randomness off)
    x <- x + step * v,   step <- max(step * step_factor, min_step)

A particle whose utility has not risen over `restart_patience` iterations restarts from its
personal best with zero velocity (then waits 3 iterations before it may restart again); the
search stops early when the global best has not improved over `patience` iterations. The global
best answers the test set. Defaults are the reference's, except `max_iterations`: 10 in the
reference and the paper, 3 here so a CPU run scores at most 3 x members candidates (raise it on
GPUs). Departures: members must have identical tensor shapes (the reference pads embeddings of
different vocabularies); the paper's experts are LoRA adapters, here whole models.

Every swarm vector is a weight dir on disk (`SwarmDirs`): positions start as the members' own
dirs; velocities, later positions and the bests are float32 dirs (weights only) under the job's
workdir, so the math is the in-memory float32 math, and a dir is deleted once no particle,
personal best or global best/worst refers to it. One particle's step is one streaming pass over
its velocity, personal best, the global best and worst, and its position, writing its new
velocity, its new position and that position's candidate (members' dtypes, config, tokenizer)
for scoring. Disk: up to three float32 models per particle plus two, and the candidates. The
step after the last scored iteration is skipped (its positions would never be scored).
"""
from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.weight._merge import (
    Candidates,
    Members,
    Output,
    WeightFields,
    WeightsDir,
    answer_with,
    combine,
    delta,
    linear,
    load_members,
    require_fitted,
    stream_merge,
)
from moco_ray.tasks.base import DevSplit, Example

RESTART_COOLDOWN = 3  # iterations a restarted particle waits before it may restart again (ref.)


@dataclass(frozen=True)
class SwarmSettings:
    inertia: float = 0.2
    cognitive_coeff: float = 0.3
    social_coeff: float = 0.4
    repel_coeff: float = 0.05
    repel_term: bool = True
    weight_randomness: bool = True
    step_length: float = 0.5
    step_length_factor: float = 0.95
    minimum_step_length: float = 0.1
    patience: int = 5
    restart_patience: int = 3


# A swarm vector: a state dict in memory (a small vector, e.g. DARE-TIES' merge weights), or a
# weights dir (`SwarmDirs`). None as a velocity is the zero vector.
Vector = Any
# move(i, v, p, g, w, x, (wv, wp, wg, wr), step) -> (v', x') of particle i, with
#   v' = wv v + wp (p - x) + wg (g - x) + wr (x - w),   x' = x + step v'
Move = Callable[[int, Vector, Vector, Vector, Vector, Vector, tuple[float, float, float, float],
                 float], tuple[Vector, Vector]]


def velocity_terms(v: Vector, p: Vector, g: Vector, w: Vector, x: Vector,
                   coeffs: tuple[float, float, float, float]) -> tuple[list, list[float]]:
    """v' as one linear combination of (v, p, g, w, x), in that order; a None (zero) velocity
    is left out."""
    wv, wp, wg, wr = coeffs
    terms = [(v, wv), (p, wp), (g, wg), (w, -wr), (x, -wp - wg + wr)]
    terms = [(t, c) for t, c in terms if t is not None]
    return [t for t, _ in terms], [c for _, c in terms]


def memory_move(i: int, v, p, g, w, x, coeffs, step):
    """The step of a particle whose vectors are state dicts in memory."""
    vectors, weights = velocity_terms(v, p, g, w, x, coeffs)
    v2 = linear(vectors, weights)
    return v2, linear([x, v2], [1.0, step])


def partner_velocities(positions: Sequence[Vector], rng: random.Random,
                       difference: Callable[[Vector, Vector], Vector] = delta) -> list[Vector]:
    """Model Swarms' random start: particle i's velocity is x_j - x_i for a random j != i
    (`difference(x_j, x_i)`)."""
    n = len(positions)
    if n < 2:
        raise ValueError("a swarm with random starting velocities needs at least 2 particles")
    out = []
    for i in range(n):
        j = rng.choice([k for k in range(n) if k != i])
        out.append(difference(positions[j], positions[i]))
    return out


@dataclass
class WeightSwarm:
    """PSO over vectors: state dicts in memory (any dict of tensors: whole models, or one small
    vector) by default, or whatever `mover` moves (`SwarmDirs.move`: weight dirs). `update`
    takes one utility per particle (higher is better) and returns True when the search should
    stop. `tags` (e.g. candidate dirs) follow the positions into the bests."""

    positions: list[Vector]
    velocities: list[Vector]
    settings: SwarmSettings
    rng: random.Random
    mover: Move = memory_move
    step: float = field(init=False)
    personal_best: list[Vector] = field(init=False)
    personal_best_score: list[float | None] = field(init=False)
    history: list[list[float]] = field(init=False)
    restart_counter: list[int] = field(init=False)
    global_best: Vector = None
    global_best_score: float | None = None
    global_best_tag: object = None
    global_worst: Vector = None
    global_worst_score: float | None = None
    global_history: list[float] = field(default_factory=list)
    restarts: int = 0

    def __post_init__(self):
        n = len(self.positions)
        if len(self.velocities) != n or n == 0:
            raise ValueError(f"swarm needs one velocity per particle: {n} positions, "
                             f"{len(self.velocities)} velocities")
        self.step = self.settings.step_length
        self.personal_best = list(self.positions)
        self.personal_best_score = [None] * n
        self.history = [[] for _ in range(n)]
        self.restart_counter = [0] * n

    def update(self, scores: Sequence[float], tags: Sequence[object] | None = None,
               move: bool = True) -> bool:
        """Record the particles' utilities, then (unless stopping, or `move` is False: no
        iteration follows) restart stalled particles and move every particle."""
        s, n = self.settings, len(self.positions)
        if len(scores) != n:
            raise ValueError(f"got {len(scores)} scores for {n} particles")
        tags = list(tags) if tags is not None else [None] * n
        for i, sc in enumerate(scores):
            self.history[i].append(sc)
            if self.personal_best_score[i] is None or sc > self.personal_best_score[i]:
                self.personal_best_score[i], self.personal_best[i] = sc, self.positions[i]
        best = max(range(n), key=lambda i: scores[i])  # first index on ties
        worst = min(range(n), key=lambda i: scores[i])
        if self.global_best_score is None or scores[best] > self.global_best_score:
            self.global_best_score, self.global_best = scores[best], self.positions[best]
            self.global_best_tag = tags[best]
        if self.global_worst_score is None or scores[worst] < self.global_worst_score:
            self.global_worst_score, self.global_worst = scores[worst], self.positions[worst]
        self.global_history.append(self.global_best_score)
        g = self.global_history
        if len(g) > s.patience and g[-1] <= g[-s.patience]:
            return True
        if not move:
            return False
        for i in range(n):
            h = self.history[i]
            if (len(h) > s.restart_patience and h[-1] <= h[-s.restart_patience]
                    and self.restart_counter[i] == 0):
                self.restart_counter[i] = RESTART_COOLDOWN
                self.positions[i] = self.personal_best[i]
                self.velocities[i] = None  # zero velocity
                self.restarts += 1
            else:
                self.restart_counter[i] = max(0, self.restart_counter[i] - 1)
            self._move(i)
        self.step = max(self.step * s.step_length_factor, s.minimum_step_length)
        return False

    def live(self) -> list[Vector]:
        """Every vector the swarm still refers to."""
        return [*self.positions, *self.velocities, *self.personal_best, self.global_best,
                self.global_worst]

    def coefficients(self) -> tuple[float, float, float, float]:
        """One draw of the normalised (inertia, cognitive, social, repel) weights."""
        s = self.settings
        r = [self.rng.uniform(0, 1) for _ in range(4)] if s.weight_randomness else [1.0] * 4
        w = [r[0] * s.inertia, r[1] * s.cognitive_coeff, r[2] * s.social_coeff,
             r[3] * s.repel_coeff if s.repel_term else 0.0]
        total = sum(w)
        return tuple(x / total for x in w)  # type: ignore[return-value]

    def _move(self, i: int) -> None:
        self.velocities[i], self.positions[i] = self.mover(
            i, self.velocities[i], self.personal_best[i], self.global_best, self.global_worst,
            self.positions[i], self.coefficients(), self.step)


class SwarmDirs:
    """Swarm vectors as weight dirs. The start positions are the members' dirs (never
    deleted); every other vector is a float32 dir under `root`, written by `difference` or
    `move`. `candidate[x]` is the dir that serves position x (a member's own dir, or the
    candidate `move` wrote with it); `label` names the candidates the next moves write."""

    def __init__(self, cands: Candidates, members: Members):
        self.cands = cands
        self.root = cands.root / ".swarm"
        self.opened: dict[str, WeightsDir] = {members.dirs[m]: members.weights[m]
                                              for m in members.names}
        self.candidate: dict[str, str] = {d: d for d in members.dirs.values()}
        self.written: set[str] = set()
        self.label = "particle"
        self._count = 0

    def _output(self, kind: str) -> Output:
        self._count += 1
        return Output(self.root / f"{self._count:05d}-{kind}")

    def _open(self, path: str) -> WeightsDir:
        if path not in self.opened:
            self.opened[path] = WeightsDir(path)
        return self.opened[path]

    def _track(self, *paths: str) -> None:
        self.written.update(paths)

    def difference(self, a: str, b: str) -> str:
        """The dir of a - b."""
        [out] = stream_merge([self._open(a), self._open(b)],
                             lambda name, ts: ts[0] - ts[1], [self._output("velocity")])
        self._track(out)
        return out

    def move(self, i: int, v, p, g, w, x, coeffs, step) -> tuple[str, str]:
        """One streaming pass: v' and x' (float32 dirs) and x's candidate."""
        vectors, weights = velocity_terms(v, p, g, w, x, coeffs)
        # x first: tensors that are not floating point are copied from the first input
        inputs = [self._open(x)] + [self._open(d) for d in vectors]

        def fn(name, ts):
            v2 = combine(ts[1:], weights)
            x2 = combine([ts[0], v2], [1.0, step])
            return v2, x2, x2

        v2, x2, cand = stream_merge(
            inputs, fn, [self._output("velocity"), self._output("position"),
                         self.cands.output(f"{self.label}{i}")])
        self._track(v2, x2)
        self.candidate[x2] = cand
        return v2, x2

    def collect(self, live: Sequence[str | None]) -> None:
        """Delete the dirs this wrote that are not in `live`."""
        for d in self.written - set(live):
            shutil.rmtree(d, ignore_errors=True)
            self.written.discard(d)
            self.opened.pop(d, None)
            self.candidate.pop(d, None)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.written.clear()


class SwarmFields(WeightFields):
    """The swarm's hyperparameters (the reference's defaults)."""

    inertia: float = Field(0.2, ge=0.0)
    cognitive_coeff: float = Field(0.3, ge=0.0, description="pull to the particle's best")
    social_coeff: float = Field(0.4, ge=0.0, description="pull to the global best")
    repel_coeff: float = Field(0.05, ge=0.0, description="push away from the global worst")
    repel_term: bool = True
    weight_randomness: bool = Field(True, description="random U(0,1) factors on the four pulls")
    step_length: float = Field(0.5, gt=0.0)
    step_length_factor: float = Field(0.95, gt=0.0, le=1.0)
    minimum_step_length: float = Field(0.1, ge=0.0)
    patience: int = Field(5, ge=1, description="stop when the global best has not improved "
                                               "over this many iterations")
    restart_patience: int = Field(3, ge=1, description="restart a particle from its best "
                                                       "after this many iterations without gain")

    def swarm_settings(self) -> SwarmSettings:
        if self.inertia + self.cognitive_coeff + self.social_coeff + (
                self.repel_coeff if self.repel_term else 0.0) <= 0:
            raise ValueError("params.inertia, cognitive_coeff, social_coeff and repel_coeff are "
                             "all 0: particles could not move; make one of them positive")
        return SwarmSettings(**self.model_dump(include=set(SwarmSettings.__dataclass_fields__)))


@register("weight_model_swarms")
class ModelSwarms(Strategy):
    level = "weight"
    summary = "members as PSO particles in weight space; the global best on dev answers"
    needs_scratch = True

    class Params(SwarmFields):
        max_iterations: int = Field(3, ge=1, description="swarm iterations (reference and "
                                    "paper: 10); each scores one candidate per member")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p = self.params
        settings = p.swarm_settings()
        members = await load_members(ctx, min_models=2, who=self.name)
        cands = Candidates(ctx, dev, p, self.name, members)
        space = SwarmDirs(cands, members)
        positions = [members.dirs[m] for m in members.names]
        try:
            velocities = await asyncio.to_thread(partner_velocities, positions, ctx.rng,
                                                 space.difference)
            swarm = WeightSwarm(positions, velocities, settings, ctx.rng, space.move)
            per_iteration: list[list[float]] = []
            for it in range(p.max_iterations):
                paths, scores = [], []
                for i, x in enumerate(swarm.positions):
                    path = space.candidate[x]
                    if it == 0:  # the members themselves: their own dirs
                        score = await cands.score_dir(path, members.names[i])
                    else:
                        score = await cands.score_dir(path, f"it{it}_particle{i}", written=True)
                    paths.append(path)
                    scores.append(score)
                per_iteration.append(scores)
                space.label = f"it{it + 1}_particle"
                stop = await asyncio.to_thread(swarm.update, scores, paths,
                                               it + 1 < p.max_iterations)
                space.collect(swarm.live())
                cands.prune({swarm.global_best_tag})
                if stop:
                    break
        finally:
            space.clear()  # the float32 state; the chosen candidate is a candidate dir
        self.fitted.update(weights=swarm.global_best_tag, dev_score=swarm.global_best_score,
                           scores=per_iteration, restarts=swarm.restarts,
                           candidates=cands.summary())

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        weights = require_fitted(self)
        text = await answer_with(ctx, weights, self.params)
        return Answer(output=text, meta={"weights": weights,
                                         "dev_score": self.fitted["dev_score"],
                                         "scores": self.fitted["scores"]})
