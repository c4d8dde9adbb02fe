"""FusionRoute-style token-level routing: at every decoding step a light router picks one expert
of the logit group and the next token comes from that expert's distribution, optionally plus a
complementary logit (here: `complement` times the mean of all members' log-probs). The
FusionRoute paper trains an LLM router that also emits the complementary logit; MoCo has no
implementation to follow, so the router here is a small learned scorer:

    score_m = coef . (top-1 probability_m, top-k entropy_m) + bias_m,   expert = argmax_m

fit on dev rollouts: every model answers each dev question greedily with top-k logprobs; every
step of a rollout is a row (that step's features, the model's one-hot) labelled with whether the
rollout was right, weighted 1 / rollout length; a logistic regression with an L2 penalty gives
coef and the per-model biases. So the router learns how far each model's confidence can be
trusted and which model is right more often. Optionally the complement is picked on dev from a
grid. Decoding runs in the logit group's lockstep decoder as the combine mode
'route:{"coef": ..., "top_k": ..., "complement": ...}' with the biases as the weights, one per
job model in the job's order (the group's members, in its order).
"""
from __future__ import annotations

import asyncio
import json
import math

import torch
from pydantic import Field

from moco_ray.records import TokenLogprobs
from moco_ray.strategies.base import Answer, ExampleContext, Strategy, StrategyContext, register
from moco_ray.strategies.common import SamplingFields, over_dev
from moco_ray.tasks.base import DevSplit, Example


@register("logit_fusion_route")
class FusionRoute(Strategy):
    level = "logit"
    summary = "a learned router picks the expert model at every decoding step"

    class Params(SamplingFields):
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(20, ge=1, le=20, description="logprobs per step the entropy feature "
                                                        "is taken over (vLLM reports <= 20)")
        complement: float = Field(0.0, ge=0.0, description="weight of the complementary logit "
                                                           "(mean of all log-probs); 0 = route")
        complement_grid: list[float] = Field(default_factory=list, description="complements to "
                                             "try on dev (empty: use `complement`)")
        l2: float = Field(1e-2, ge=0.0, description="L2 penalty of the router's regression")
        dev_size: int | None = Field(None, ge=1, description="dev examples (None: all)")

    async def fit(self, ctx: StrategyContext, dev: DevSplit) -> None:
        p, models = self.params, ctx.models
        if any(c < 0 for c in p.complement_grid):
            raise ValueError(f"complement_grid {p.complement_grid} must be >= 0")

        async def rollouts(ectx: ExampleContext, ex: Example) -> list[tuple[list, float]]:
            prompt = ctx.task.prompt(ex)
            # greedy: the features describe each model's own most likely path
            sp = p.sampling(ctx.task).model_copy(update={"temperature": 0.0, "seed": None,
                                                         "logprobs": p.top_k})
            gens = await asyncio.gather(*(ectx.generate(m, prompt, sp, step="dev_rollout")
                                          for m in models))
            out = []
            for m, [g] in zip(models, gens):
                if g.logprobs is None and g.completion_tokens > 0:
                    raise RuntimeError(f"model {m!r} returned no logprobs although logprobs="
                                       f"{p.top_k} was asked; logit_fusion_route needs them")
                out.append(([step_features(t, p.top_k) for t in g.logprobs or []],
                            ctx.task.score(g.text, ex)))
            return out

        data = await over_dev(ctx, dev, p.dev_size, rollouts)
        x, y, w = [], [], []
        for per_model in data:
            for i, (steps, correct) in enumerate(per_model):
                for f in steps:
                    x.append(list(f) + [1.0 if j == i else 0.0 for j in range(len(models))])
                    y.append(correct)
                    w.append(1.0 / len(steps))
        if not x:
            raise RuntimeError("no dev rollout produced a token; logit_fusion_route learns its "
                               "router from per-token features of dev rollouts")
        if max(y) - min(y) < 1e-9:
            # every rollout right (or every one wrong): nothing to learn; trust confidence
            coef, biases, note = [1.0, 0.0], [0.0] * len(models), "no signal on dev"
        else:
            coef, biases = await asyncio.to_thread(fit_router, x, y, w, p.l2, len(models))
            note = ""
        complement = p.complement
        self.fitted.update(coef=coef, biases=biases, complement=complement, note=note,
                           dev_accuracy={m: sum(r[i][1] for r in data) / len(data)
                                         for i, m in enumerate(models)})
        if p.complement_grid:
            self.fitted["complement"] = await self._pick_complement(ctx, dev)

    async def _pick_complement(self, ctx: StrategyContext, dev: DevSplit) -> float:
        p = self.params
        grid = [p.complement] + [c for c in p.complement_grid if c != p.complement]

        async def one(ectx: ExampleContext, ex: Example) -> list[float]:
            sp = p.sampling(ctx.task, ectx.rng)  # one seed for all: they differ only in c
            gens = await asyncio.gather(*(
                ectx.fused_generate(ctx.task.prompt(ex), sp, self.mode(c), self.fitted["biases"],
                                    step="dev_fused") for c in grid))
            return [ctx.task.score(g.text, ex) for g in gens]

        rows = await over_dev(ctx, dev, p.dev_size, one)
        means = [sum(r[i] for r in rows) / len(rows) for i in range(len(grid))]
        self.fitted["complement_dev_scores"] = dict(zip(map(str, grid), means))
        return grid[max(range(len(grid)), key=lambda i: (means[i], -i))]

    def mode(self, complement: float) -> str:
        return "route:" + json.dumps({"coef": self.fitted["coef"], "top_k": self.params.top_k,
                                      "complement": complement})

    async def solve(self, ctx: ExampleContext, example: Example) -> Answer:
        if "coef" not in self.fitted:
            raise RuntimeError("logit_fusion_route needs fit(dev) first: it learns its router "
                               "from dev rollouts")
        mode, biases = self.mode(self.fitted["complement"]), self.fitted["biases"]
        gen = await ctx.fused_generate(ctx.task.prompt(example),
                                       self.params.sampling(ctx.task, ctx.rng), mode, biases,
                                       step="routed")
        return Answer(output=gen.text, meta={"mode": mode, "biases": biases})


def step_features(t: TokenLogprobs, top_k: int) -> tuple[float, float]:
    """(top-1 probability, entropy of the renormalized top-k) of one step, as the lockstep
    decoder's `route_features` computes them from full log-probs."""
    vals = sorted(t.top.values(), reverse=True)[:top_k] if t.top else [t.logprob]
    z = max(vals)
    log_norm = z + math.log(sum(math.exp(v - z) for v in vals))
    entropy = -sum(math.exp(v - log_norm) * (v - log_norm) for v in vals)
    return math.exp(vals[0]), entropy


def fit_router(x: list[list[float]], y: list[float], w: list[float], l2: float,
               n_models: int) -> tuple[list[float], list[float]]:
    """Weighted L2-penalized logistic regression (LBFGS); the last `n_models` columns are the
    one-hot model identity, so their coefficients are the per-model biases."""
    X, Y, W = torch.tensor(x), torch.tensor(y), torch.tensor(w)
    W = W / W.sum()
    theta = torch.zeros(X.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (W * torch.nn.functional.binary_cross_entropy_with_logits(
            X @ theta, Y, reduction="none")).sum() + l2 * theta.pow(2).sum()
        loss.backward()
        return loss

    # one thread: intra-op threads on tensors this small only contend for busy cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    t = theta.detach().tolist()
    return t[:-n_models], t[-n_models:]
