"""GraphRouter: routing as edge prediction on a graph of task, query and model nodes. Feng et
al., 2025, "GraphRouter: A Graph-based Router for LLM Selections" (ICLR); MoCo
`api_graph_routing.py`, whose defaults these are (hidden 8, AdamW lr 1e-4 and weight decay 1e-4,
500 epochs of 32 random edge masks, mask rate 0.5, split 0.8 / 0.1 / 0.1, scenario
'Performance First').

Every model answers every dev question; an edge query -> model carries (effect = score, cost,
effect - cost by the scenario's weights), and its label is 1 for the query's best model under
that tradeoff (ties: the cheaper, then the job's order). A two-layer message-passing net
updates model nodes from the visible edges and scores an edge as sigmoid(mean(query * model));
each epoch hides a random half of the training edges and learns to predict them from the rest;
the epoch with the best validation macro-F1 is kept. A test query is routed to its top-scoring
model, with every dev edge visible.

Differences from the reference, each because of this machine or a bug there: query, task and
model texts are embedded by hashed word and character-trigram counts (the reference's MiniLM
sentence encoder cannot be downloaded here), and model nodes also get a one-hot identity since
generated descriptions are alike; costs are measured (tokens per dev call, scaled to [0, 1]) or
given, where the reference set every cost to 1.0 (making its scenarios moot); test routing uses
the dev graph, where the reference built a graph of test queries with placeholder edges.
"""
from __future__ import annotations

import asyncio
import copy
import re
import zlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moco_ray.strategies.api.prompt_routing import question_text
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example

# (effect weight, cost weight) of each scenario, as in the reference.
SCENARIOS = {"Performance First": (1.0, 0.0), "Balance": (0.5, 0.5), "Cost First": (0.2, 0.8)}


@register("api_graph_routing")
class GraphRouting(Strategy):
    level = "api"
    summary = "a small GNN over task/query/model nodes, fit on dev outcomes, picks each model"
    _router: tuple | None = None  # (net, model node states, task features) once fitted

    class Params(SamplingFields):
        scenario: Literal["Performance First", "Balance", "Cost First"] = "Performance First"
        model_costs: list[float] | None = Field(None, description="cost per job model (None: "
                                                                  "measured tokens per dev call)")
        model_descriptions: list[str] | None = Field(None, description="one per job model")
        task_description: str | None = Field(None, description="None: the task's name")
        hidden_features: int = Field(8, ge=1)
        learning_rate: float = Field(1e-4, gt=0.0)
        weight_decay: float = Field(1e-4, ge=0.0)
        train_epochs: int = Field(500, ge=1)
        batch_size: int = Field(32, ge=1, description="random edge masks per epoch")
        train_mask_rate: float = Field(0.5, gt=0.0, lt=1.0,
                                       description="share of training edges visible per mask")
        split_ratio: list[float] = Field([0.8, 0.1, 0.1], min_length=3, max_length=3,
                                         description="dev share for train / validation / report")
        feature_dim: int = Field(256, ge=8, description="hashed text features per node")
        dev_size: int | None = Field(None, ge=1, description="dev examples (None: all)")

        @model_validator(mode="after")
        def _check(self):
            s = self.split_ratio
            if any(x < 0 for x in s) or abs(sum(s) - 1.0) > 1e-6 or s[0] <= 0:
                raise ValueError(f"split_ratio {s} must be 3 shares >= 0 summing to 1, with a "
                                 "positive training share")
            if self.model_costs is not None and any(c < 0 for c in self.model_costs):
                raise ValueError(f"model_costs {self.model_costs} must be >= 0")
            return self

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, models = self.params, ctx.models
        for name, given in (("model_costs", p.model_costs),
                            ("model_descriptions", p.model_descriptions)):
            if given is not None and len(given) != len(models):
                raise ValueError(f"params.{name} has {len(given)} entries for {len(models)} "
                                 f"models {models}; give one per model, in order")

        async def one(ectx: ExampleContext, ex: Example) -> list[tuple[float, int]]:
            prompt = ctx.task.prompt(ex)
            gens = await asyncio.gather(*(
                ectx.generate(m, prompt, p.sampling(ctx.task, ectx.rng), step="dev_answer")
                for m in models))
            return [(ctx.task.score(g.text, ex), g.prompt_tokens + g.completion_tokens)
                    for [g] in gens]

        examples = dev.examples[:p.dev_size] if p.dev_size else dev.examples
        rows = await over_dev(ctx, dev, p.dev_size, one)
        effect = torch.tensor([[s for s, _ in r] for r in rows])
        if p.model_costs is not None:
            cost = torch.tensor(p.model_costs, dtype=torch.float).expand_as(effect).clone()
        else:
            cost = torch.tensor([[float(t) for _, t in r] for r in rows])
        cost = cost / cost.max().clamp(min=1e-9)
        queries = [question_text(ctx.task.prompt(ex)) for ex in examples]
        descriptions = p.model_descriptions or [f"language model {m}" for m in models]
        graph = _Graph.build(queries, p.task_description or ctx.task.name, descriptions,
                             effect, cost, p, ctx.seed)
        net, h_models, report = await asyncio.to_thread(_train, graph, p, ctx.seed)
        # The trained net stays off `fitted`, which holds plain values for inspection.
        self._router = (net, h_models, graph.xt)
        self.fitted.update(models=list(models), labels_per_model=dict(zip(
            models, graph.labels.sum(0).tolist())),
            dev_accuracy=dict(zip(models, effect.mean(0).tolist())), **report)

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if self._router is None:
            raise RuntimeError("api_graph_routing needs fit(dev) first: it trains the graph "
                               "router on dev outcomes")
        p = self.params
        prompt = ctx.task.prompt(example)
        scores = self.route_scores([question_text(prompt)])[0]
        chosen = self.fitted["models"][int(scores.argmax())]
        [gen] = await ctx.generate(chosen, prompt, p.sampling(ctx.task, ctx.rng), step="answer")
        return Answer(output=gen.text, meta={"routed_to": chosen,
                                             "router_scores": [round(s, 4) for s in
                                                               scores.tolist()]})

    def route_scores(self, questions: list[str]) -> torch.Tensor:
        """Edge scores [questions, models] with every dev edge visible."""
        net, h_models, x_task = self._router
        with torch.no_grad():
            xq = torch.stack([text_features(q, self.params.feature_dim) for q in questions])
            return net.score(net.queries(xq, x_task), h_models[None])[0]


def best_models(combined: torch.Tensor, cost: torch.Tensor) -> list[int]:
    """Per query, the model with the best combined effect; ties go to the cheaper model, then
    to the earlier one (the reference's argmax took the first)."""
    out = []
    for c_row, k_row in zip(combined.tolist(), cost.tolist()):
        top = max(c_row)
        out.append(min((k, i) for i, (c, k) in enumerate(zip(c_row, k_row))
                       if c >= top - 1e-9)[1])
    return out


def text_features(text: str, dim: int) -> torch.Tensor:
    """Hashed counts of words and character trigrams, L2-normalized (crc32: the same in every
    process, unlike Python's salted hash)."""
    words = re.findall(r"\w+", text.lower())
    grams = words + [w[i:i + 3] for w in words if len(w) > 3 for i in range(len(w) - 2)]
    v = torch.zeros(dim)
    for g in grams:
        v[zlib.crc32(g.encode()) % dim] += 1.0
    return v / v.norm().clamp(min=1e-9)


class _Graph:
    """Node features, edge features [Q, M, 3], labels [Q, M] and the dev split of the queries."""

    @classmethod
    def build(cls, queries, task, descriptions, effect, cost, p, seed: int) -> _Graph:
        g = cls()
        d, n_m = p.feature_dim, len(descriptions)
        g.xq = torch.stack([text_features(q, d) for q in queries])
        g.xt = text_features(task, d)
        g.xm = torch.cat([torch.stack([text_features(t, d) for t in descriptions]),
                          torch.eye(n_m)], dim=1)
        a, b = SCENARIOS[p.scenario]
        combined = a * effect - b * cost
        g.edges = torch.stack([effect, cost, combined], dim=-1)
        g.labels = F.one_hot(torch.tensor(best_models(combined, cost)), n_m).float()
        g.effect = effect
        n = len(queries)
        # a seeded shuffle: dev files are often grouped by topic, which a prefix split would skew
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_train = max(1, int(n * p.split_ratio[0]))
        n_val = int(n * p.split_ratio[1])
        g.split = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
                   "report": order[n_train + n_val:]}
        return g

    def rows(self, which: str) -> torch.Tensor:
        mask = torch.zeros(len(self.xq), dtype=torch.bool)
        mask[self.split[which]] = True
        return mask


class _Net(nn.Module):
    def __init__(self, feat_dim: int, n_models: int, hidden: int):
        super().__init__()
        h2 = 2 * hidden  # a query node is [task; query], a model node matches its width
        self.task, self.query = nn.Linear(feat_dim, hidden), nn.Linear(feat_dim, hidden)
        self.model = nn.Linear(feat_dim + n_models, h2)
        self.edge = nn.Linear(3, 3)
        self.msg = nn.ModuleList([nn.Linear(h2 + 3, h2) for _ in range(2)])
        self.root = nn.ModuleList([nn.Linear(h2, h2) for _ in range(2)])
        self.norm = nn.ModuleList([nn.LayerNorm(h2) for _ in range(2)])

    def queries(self, xq: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.task(xt).expand(len(xq), -1), self.query(xq)], dim=-1)

    def models(self, q: torch.Tensor, xm: torch.Tensor, edges: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """Model node states [K, M, 2h] after two rounds of messages from the edges visible in
        each of K masks (visible: [K, Q, M])."""
        n_q, n_m = edges.shape[:2]
        e = F.relu(self.edge(edges))
        w = visible.float()
        w = w / w.sum(1, keepdim=True).clamp(min=1.0)  # mean over each model's visible queries
        h = self.model(xm).expand(len(visible), -1, -1)
        qe = torch.cat([q[:, None, :].expand(n_q, n_m, -1), e], dim=-1)
        for msg, root, norm in zip(self.msg, self.root, self.norm):
            h = norm(F.relu(root(h) + torch.einsum("kqm,qmh->kmh", w, msg(qe))))
        return h

    @staticmethod
    def score(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Edge probabilities [K, P, M] for queries q [P, 2h] and model states h [K, M, 2h]."""
        return torch.sigmoid(torch.einsum("ph,kmh->kpm", q, h) / q.shape[-1])


def _train(g: _Graph, p, seed: int) -> tuple[_Net, torch.Tensor, dict]:
    # A net this small trains ~30x faster on one thread than with intra-op threads contending
    # for the cores (measured: 0.6 s vs 20 s for the tests' setting on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_loop(g, p, seed)
    finally:
        torch.set_num_threads(threads)


def _train_loop(g: _Graph, p, seed: int) -> tuple[_Net, torch.Tensor, dict]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _Net(p.feature_dim, g.labels.shape[1], p.hidden_features)
        opt = torch.optim.AdamW(net.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay)
        train, val = g.rows("train"), g.rows("val")
        train_edges = train[:, None].expand_as(g.labels)
        best_f1, best_state = -1.0, None
        for _ in range(p.train_epochs):
            net.train()
            see = (torch.rand((p.batch_size,) + g.labels.shape) < p.train_mask_rate) & train_edges
            predict = train_edges & ~see
            q = net.queries(g.xq, g.xt)
            s = _Net.score(q, net.models(q, g.xm, g.edges, see))
            # BCE over each mask's hidden edges, then the mean over masks (as the reference)
            bce = F.binary_cross_entropy(s, g.labels.expand_as(s), reduction="none")
            counts = predict.sum((1, 2))
            if not bool((counts > 0).any()):
                continue
            per_mask = (bce * predict).sum((1, 2))[counts > 0] / counts[counts > 0]
            opt.zero_grad()
            per_mask.mean().backward()
            opt.step()
            if val.any():
                f1 = _macro_f1(_route(net, g, train_edges)[val], g.labels.argmax(1)[val])
                if f1 > best_f1:
                    best_f1, best_state = f1, copy.deepcopy(net.state_dict())
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        with torch.no_grad():
            q = net.queries(g.xq, g.xt)
            everything = torch.ones((1,) + g.labels.shape, dtype=torch.bool)
            h_models = net.models(q, g.xm, g.edges, everything)[0]
            picked = _route(net, g, train_edges)
        report = g.rows("report")
        out = {"val_macro_f1": best_f1 if best_state is not None else None}
        if report.any():
            idx = picked[report]
            out["report_routed_accuracy"] = float(g.effect[report].gather(1, idx[:, None]).mean())
            out["report_oracle_accuracy"] = float(g.effect[report].max(1).values.mean())
        return net, h_models, out


def _route(net: _Net, g: _Graph, visible: torch.Tensor) -> torch.Tensor:
    """Top model per query, messages from `visible` edges only."""
    with torch.no_grad():
        q = net.queries(g.xq, g.xt)
        return _Net.score(q, net.models(q, g.xm, g.edges, visible[None]))[0].argmax(1)


def _macro_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """Macro F1 over the classes in gold or pred (sklearn's default label set)."""
    f1s = []
    for c in torch.cat([pred, gold]).unique().tolist():
        tp = float(((pred == c) & (gold == c)).sum())
        fp, fn = float(((pred == c) & (gold != c)).sum()), float(((pred != c) & (gold == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)
