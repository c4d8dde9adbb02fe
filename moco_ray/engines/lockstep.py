"""Lockstep decoding: several causal LMs that share one tokenizer pick each next token together.

Every step, each model scores the next token from its own KV cache; a registered combine function
turns the models' log-probs into one distribution (logit fusion: weighted mean of log-softmax;
contrastive: expert minus amateur; route: a learned router picks one model's distribution per
step), and one token is sampled or taken greedily for every model.

Fixes over the reference's logit arithmetic (MoCo `utils/logit_arithmetic.py`): each model keeps a
KV cache (the reference re-ran the whole sequence every step), left-padded batches get an attention
mask and mask-derived position ids (so a padded row decodes exactly as it would alone), and the
temperature given is the temperature used. Pure torch + transformers: the pool's LogitGroup
deployment wraps it; nothing here knows about Ray.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

# (log-probs [models, batch, vocab], weights [models]) -> scores [batch, vocab]; the decoder
# renormalizes the scores with log-softmax, so a combine function need not.
CombineFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_COMBINERS: dict[str, CombineFn] = {}


def register_combine(name: str):
    """Decorator: register a combine function under `name`; a duplicate name is an error."""

    def deco(fn: CombineFn) -> CombineFn:
        if (name in _COMBINERS and _COMBINERS[name] is not fn) or name in _FACTORIES:
            raise ValueError(f"combine function {name!r} is already registered")
        _COMBINERS[name] = fn
        return fn

    return deco


# Parametrized modes: "name:{json}" builds a combine function from its JSON parameters, so
# a mode with more settings than one weight per model (a learned router) still travels as the
# one mode string that the pool forwards (and batches requests by).
CombineFactory = Callable[[dict], CombineFn]
_FACTORIES: dict[str, CombineFactory] = {}


def register_combine_factory(name: str):
    """Decorator: register a factory(params) -> CombineFn under `name`."""

    def deco(fn: CombineFactory) -> CombineFactory:
        if name in _COMBINERS or (name in _FACTORIES and _FACTORIES[name] is not fn):
            raise ValueError(f"combine mode {name!r} is already registered")
        _FACTORIES[name] = fn
        return fn

    return deco


def get_combine(name: str) -> CombineFn:
    base, _, arg = name.partition(":")
    if base in _FACTORIES:
        try:
            params = json.loads(arg) if arg else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"combine mode {name!r}: the parameters after ':' must be a JSON "
                             f"object ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"combine mode {name!r}: the parameters after ':' must be a JSON "
                             "object")
        return _FACTORIES[base](params)
    try:
        return _COMBINERS[name]
    except KeyError:
        valid = ", ".join(sorted([*_COMBINERS, *_FACTORIES]))
        raise KeyError(f"unknown combine mode {name!r}; valid: {valid}") from None


@register_combine("fusion")
def fusion(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the models' log-softmax (a product of experts)."""
    if bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(f"fusion weights must be >= 0 with a positive sum; got "
                         f"{weights.tolist()} (use combine='contrastive' for negative weights)")
    return torch.einsum("m,mbv->bv", weights / weights.sum(), logps)


@register_combine("contrastive")
def contrastive(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Signed sum of log-probs: experts get positive weights, amateurs negative (DExperts,
    proxy tuning), e.g. weights [1, -1] for expert - amateur."""
    if not bool((weights < 0).any()):
        raise ValueError(f"contrastive weights need at least one negative (amateur) weight; got "
                         f"{weights.tolist()} (use combine='fusion' for a plain mixture)")
    return torch.einsum("m,mbv->bv", weights, logps)


ROUTE_FEATURES = ("maxprob", "entropy")


def route_features(logps: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-model router features [models, batch, 2]: the top-1 probability, and the entropy of
    the top-`top_k` distribution renormalized (what an engine reporting top-k logprobs, e.g.
    vLLM, shows of a model, so a router fit on such reports sees the same numbers here)."""
    vals = logps.topk(min(top_k, logps.shape[-1]), dim=-1).values
    q = F.log_softmax(vals, dim=-1)
    entropy = -(q.exp() * q).sum(-1)
    return torch.stack([vals[..., 0].exp(), entropy], dim=-1)


@register_combine_factory("route")
def route(params: dict) -> CombineFn:
    """Token-level routing (FusionRoute-style): at each step a linear router scores every model,
    score_m = coef . features_m + weight_m (the weights are per-model biases), and the step's
    distribution is the top-scoring model's log-probs plus `complement` times the mean of all
    models' log-probs (the complementary logit; 0 = pure routing). Parameters (JSON):
    coef (one per ROUTE_FEATURES, default [1, 0]: the most confident model), top_k (20),
    complement (0)."""
    unknown = sorted(set(params) - {"coef", "top_k", "complement"})
    if unknown:
        raise ValueError(f"route parameters {unknown} are unknown; valid: coef, top_k, "
                         "complement")
    coef = [float(c) for c in params.get("coef", [1.0, 0.0])]
    if len(coef) != len(ROUTE_FEATURES):
        raise ValueError(f"route coef has {len(coef)} values; give one per feature "
                         f"{list(ROUTE_FEATURES)}")
    top_k, complement = int(params.get("top_k", 20)), float(params.get("complement", 0.0))
    if top_k < 1 or complement < 0:
        raise ValueError(f"route needs top_k >= 1 and complement >= 0; got {top_k}, "
                         f"{complement}")

    def combine(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        feats = route_features(logps, top_k)
        scores = feats @ torch.tensor(coef, device=logps.device) + weights[:, None]
        expert = scores.argmax(0)  # [batch]: ties go to the earlier model
        out = logps[expert, torch.arange(logps.shape[1], device=logps.device)]
        if complement:
            out = out + complement * logps.mean(0)
        return out

    return combine


class LockstepDecoder:
    """Decode with several models in lockstep. The models must share `tokenizer`'s vocabulary.

    The models may sit on different devices (a logit group puts one member per GPU, or spreads
    one over several with device_map='auto'): each step's input goes to each model's device,
    and every model's log-probs are gathered on `device` (default: the first model's), where
    they are combined and sampled."""

    def __init__(self, models: Sequence[PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
                 add_special_tokens: bool = True, device: str | torch.device | None = None):
        if not models:
            raise ValueError("LockstepDecoder needs at least one model")
        sizes = [m.get_output_embeddings().weight.shape[0] for m in models]
        if len(set(sizes)) != 1:
            raise ValueError(f"models must share one vocabulary for lockstep decoding; output "
                             f"vocab sizes are {sizes}. Group only models with the same tokenizer.")
        if len(tokenizer) > sizes[0]:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the models' vocabulary "
                             f"has {sizes[0]}; pass the tokenizer the models were trained with")
        self.models = [m.eval() for m in models]
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.device = torch.device(device) if device is not None else self.models[0].device
        self.max_len = min(getattr(m.config, "max_position_embeddings", 1 << 30) for m in models)
        eos: set[int] = set()
        for ids in [tokenizer.eos_token_id] + [m.generation_config.eos_token_id for m in models]:
            if ids is not None:
                eos.update([ids] if isinstance(ids, int) else ids)
        self.eos_ids = eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0  # masked out, so any id will do
        # Tokens each model's KV cache held at the end of the last generate (for inspection);
        # the caches themselves are dropped so an idle decoder holds no activation memory.
        self.last_cache_lengths: list[int] = []

    # --- one forward step of every model ----------------------------------------------------

    def _step(self, caches: list[DynamicCache], input_ids: torch.Tensor, mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs of every model for the last position: [models, batch, vocab]."""
        out = []
        for model, cache in zip(self.models, caches):
            dev = model.device
            logits = model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                           position_ids=positions.to(dev), past_key_values=cache,
                           use_cache=True).logits[:, -1, :]
            out.append(F.log_softmax(logits.float(), dim=-1).to(self.device))
        return torch.stack(out)

    def _weights(self, weights: Sequence[float] | None) -> torch.Tensor:
        n = len(self.models)
        if weights is None:
            return torch.full((n,), 1.0 / n, device=self.device)
        if len(weights) != n:
            raise ValueError(f"got {len(weights)} weights for {n} models; give one per model")
        return torch.tensor([float(w) for w in weights], device=self.device)

    @staticmethod
    def _pick(scores: torch.Tensor, temperature: float, top_p: float,
              gen: torch.Generator | None) -> torch.Tensor:
        if temperature == 0.0:
            return scores.argmax(dim=-1)
        probs = F.softmax(scores / temperature, dim=-1)
        if top_p < 1.0:
            # nucleus: keep the smallest set of tokens whose mass reaches top_p (at least one)
            sp, si = probs.sort(dim=-1, descending=True)
            drop = sp.cumsum(dim=-1) - sp >= top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        ids = [self.tokenizer.encode(p, add_special_tokens=self.add_special_tokens)
               for p in prompts]
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"prompt {i} encodes to no tokens; give a non-empty prompt")
        return ids

    # --- public -----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 combine: str = "fusion", weights: Sequence[float] | None = None,
                 top_logprobs: int = 0) -> list[dict]:
        """One completion per prompt; each a dict with Generation's fields (text, token_ids,
        finish_reason, prompt_tokens, completion_tokens, logprobs). Logprobs are those of the
        combined distribution before temperature, like vLLM's."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, "
                             f"{top_p}")
        combine_fn, w = get_combine(combine), self._weights(weights)
        ids = self._encode(prompts)
        longest = max(len(x) for x in ids)
        if longest + max_tokens > self.max_len:
            raise ValueError(f"prompt of {longest} tokens + max_tokens={max_tokens} exceeds the "
                             f"models' context of {self.max_len}; shorten it or lower max_tokens")
        b = len(ids)
        input_ids = torch.full((b, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, x in enumerate(ids):  # left-pad so every row's next token is at column -1
            input_ids[i, longest - len(x):] = torch.tensor(x)
            mask[i, longest - len(x):] = 1
        # positions count real tokens only, so a padded row sees the positions it would alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [DynamicCache(config=m.config) for m in self.models]
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)

        toks: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[dict]] = [[] for _ in range(b)]
        finish = ["length"] * b
        cut: list[int | None] = [None] * b  # text end for rows stopped by a stop string
        done = [False] * b
        logps = self._step(caches, input_ids, mask, positions)
        for step in range(max_tokens):
            scores = combine_fn(logps, w)
            logp = F.log_softmax(scores, dim=-1)
            nxt = self._pick(scores, temperature, top_p, gen)
            # one device-to-host copy per step, not one per row
            picked = nxt.tolist()
            chosen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
            if top_logprobs:
                top_v, top_k = (x.tolist() for x in logp.topk(top_logprobs, dim=-1))
            for i in range(b):
                if done[i]:
                    continue
                t = picked[i]
                toks[i].append(t)
                entry = {"token_id": t, "logprob": chosen[i]}
                if top_logprobs:
                    entry["top"] = dict(zip(top_k[i], top_v[i]))
                lps[i].append(entry)
                if t in self.eos_ids:
                    done[i], finish[i] = True, "stop"
                elif stop:
                    at = self._find_stop(toks[i], stop)
                    if at is not None:
                        done[i], finish[i], cut[i] = True, "stop", at
            if all(done) or step == max_tokens - 1:
                break
            # finished rows keep decoding a throwaway token so the batch stays rectangular
            mask = torch.cat([mask, mask.new_ones((b, 1))], dim=-1)
            positions = mask.sum(-1, keepdim=True) - 1
            logps = self._step(caches, nxt[:, None].cpu(), mask, positions)
        self.last_cache_lengths = [c.get_seq_length() for c in caches]

        out = []
        for i in range(b):
            body = [t for t in toks[i] if t not in self.eos_ids]
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            if cut[i] is not None:
                text = text[:cut[i]]
            out.append({"text": text, "token_ids": toks[i], "finish_reason": finish[i],
                        "prompt_tokens": len(ids[i]), "completion_tokens": len(toks[i]),
                        "logprobs": lps[i]})
        return out

    def _find_stop(self, tokens: list[int], stop: Sequence[str]) -> int | None:
        """Index in the decoded text where the earliest stop string begins, if any."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s and s in text]
        return min(hits) if hits else None
