"""Particle swarm optimisation as used by the Model Swarms / Heterogeneous Swarms papers (and
MoCo's `NumericSwarm`): each particle moves by a normalised mix of its inertia, the pull to its
own best, the pull to the global best and a push away from the global worst; a particle that
stops improving restarts from its personal best with a fresh random velocity; the step length
decays each iteration; the search stops early when the global best has not improved for a while.
Maximises the scores it is given.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SwarmSettings:
    population: int = 5
    starting_velocity: str = "random"  # "random" in [-1, 1] or "zero"
    weight_randomness: bool = True
    inertia: float = 0.2
    cognitive_coeff: float = 0.3
    social_coeff: float = 0.4
    repel_coeff: float = 0.05
    repel_term: bool = True
    step_length: float = 0.5
    step_length_factor: float = 0.95
    minimum_step_length: float = 0.1
    patience: int = 5
    restart_patience: int = 3


class ParticleSwarm:
    """Positions start uniform in [-1, 1]^dimension; `update(scores)` takes one score per
    particle (higher is better) and returns True when the search should stop."""

    def __init__(self, dimension: int, s: SwarmSettings, rng: np.random.Generator):
        self.s, self.rng = s, rng
        self.step = s.step_length
        self.x = rng.uniform(-1, 1, size=(s.population, dimension))
        self.v = (rng.uniform(-1, 1, size=self.x.shape) if s.starting_velocity == "random"
                  else np.zeros_like(self.x))
        self.p_best = self.x.copy()
        self.p_best_score = np.full(s.population, -np.inf)
        self.history: list[list[float]] = [[] for _ in range(s.population)]
        self.g_best, self.g_best_score = self.x[0].copy(), -np.inf
        self.g_worst, self.g_worst_score = self.x[0].copy(), np.inf
        self.g_history: list[float] = []

    def particles(self) -> np.ndarray:
        return self.x.copy()

    def update(self, scores: list[float]) -> bool:
        s = self.s
        if len(scores) != s.population:
            raise ValueError(f"got {len(scores)} scores for {s.population} particles")
        sc = np.asarray(scores, dtype=float)
        for i, score in enumerate(sc):
            self.history[i].append(float(score))
            if score > self.p_best_score[i]:
                self.p_best_score[i], self.p_best[i] = score, self.x[i].copy()
        best, worst = int(np.argmax(sc)), int(np.argmin(sc))  # first on ties
        if sc[best] > self.g_best_score:
            self.g_best_score, self.g_best = float(sc[best]), self.x[best].copy()
        if sc[worst] < self.g_worst_score:
            self.g_worst_score, self.g_worst = float(sc[worst]), self.x[worst].copy()
        self.g_history.append(self.g_best_score)
        if _stalled(self.g_history, s.patience):
            return True
        for i in range(s.population):
            if _stalled(self.history[i], s.restart_patience):
                self.x[i] = self.p_best[i]
                self.v[i] = self.rng.uniform(-1, 1, size=self.x.shape[1])
                continue
            r = self.rng.uniform(0, 1, size=4) if s.weight_randomness else np.ones(4)
            w = np.array([s.inertia, s.cognitive_coeff, s.social_coeff,
                          s.repel_coeff if s.repel_term else 0.0]) * r
            w = w / w.sum()
            self.v[i] = (w[0] * self.v[i] + w[1] * (self.p_best[i] - self.x[i])
                         + w[2] * (self.g_best - self.x[i]) + w[3] * (self.x[i] - self.g_worst))
            self.x[i] = self.x[i] + self.step * self.v[i]
        self.step = max(self.step * s.step_length_factor, s.minimum_step_length)
        return False


def _stalled(history: list[float], patience: int) -> bool:
    """The latest value is no better than the best of the `patience - 1` before it (judged only
    once more than `patience` values exist, as the reference)."""
    if len(history) <= patience:
        return False
    recent = history[-patience:]
    return recent[-1] <= max(recent[:-1])
