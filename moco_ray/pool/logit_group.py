"""`LogitGroupServer`: several pool models in ONE replica, decoded in lockstep.

Logit-level methods (fusion, contrastive decoding) need every model's next-token distribution at
every step; co-locating the models keeps that a local tensor operation with one KV cache per
model, instead of a cross-cluster RPC per token. The decoding itself is
`moco_ray.engines.lockstep.LockstepDecoder`; this module loads the models and serves it.
"""
from __future__ import annotations

import asyncio
import time

from ray import serve

from moco_ray.records import Generation, Prompt, SamplingParams, TokenLogprobs

_DTYPES = ("float32", "bfloat16", "float16")


@serve.deployment(health_check_period_s=10, health_check_timeout_s=60)
class LogitGroupServer:
    """Serves `fused_generate` over the models of one LogitGroupSpec (name -> resolved path).

    The models must share one tokenizer; the first model's tokenizer renders and encodes.
    """

    def __init__(self, name: str, paths: dict[str, str], dtype: str = "float32", seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moco_ray.engines.lockstep import LockstepDecoder

        if dtype not in _DTYPES:
            raise ValueError(f"logit group {name!r}: dtype {dtype!r} is not one of {_DTYPES}")
        self.name = name
        self.members = list(paths)
        self.paths = dict(paths)
        # Seeds the sampling of requests without their own seed: a run is reproducible as a
        # whole while repeated calls still differ (as vLLM does with its engine seed).
        torch.manual_seed(seed)
        toks = {m: AutoTokenizer.from_pretrained(p) for m, p in paths.items()}
        first = self.members[0]
        self.tokenizer = toks[first]
        vocab = self.tokenizer.get_vocab()
        differ = [m for m in self.members[1:] if toks[m].get_vocab() != vocab]
        if differ:
            raise ValueError(f"logit group {name!r}: {differ} use a different tokenizer than "
                             f"{first!r}; a group needs models with one shared vocabulary")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        models = [AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, dtype)).to(device)
                  for p in paths.values()]
        # Chat prompts are rendered by the template, which writes its own special tokens;
        # raw text gets them from the tokenizer (as vLLM and the HF engine do).
        self._decoders = {True: LockstepDecoder(models, self.tokenizer, add_special_tokens=True),
                          False: LockstepDecoder(models, self.tokenizer, add_special_tokens=False)}
        # One decode at a time: the decoder keeps its KV caches on itself, and the models are
        # shared between both decoders. Decoding runs in a thread so health checks still answer.
        self._lock = asyncio.Lock()

    def render(self, prompt: Prompt) -> str:
        from moco_ray.engines.hf_engine import render_prompt

        return render_prompt(self.tokenizer, prompt)  # the engines' own rendering

    def info(self) -> dict:
        return {"name": self.name, "models": self.members, "paths": self.paths}

    async def fused_generate(self, prompts: list[Prompt], params: SamplingParams, mode: str,
                             weights: list[float] | None) -> list[Generation]:
        """One fused Generation per prompt; `mode` is the combine name ('fusion',
        'contrastive', ...), `weights` one per member model in the group's order."""
        if weights is not None and len(weights) != len(self.members):
            raise ValueError(f"logit group {self.name!r} has {len(self.members)} models "
                             f"{self.members}; got {len(weights)} weights, give one per model")
        out: list[Generation | None] = [None] * len(prompts)
        # Raw and chat prompts encode differently (special tokens), so decode them apart.
        for raw in (True, False):
            idx = [i for i, p in enumerate(prompts) if isinstance(p, str) == raw]
            if not idx:
                continue
            texts = [self.render(prompts[i]) for i in idx]
            t0 = time.perf_counter()
            async with self._lock:
                rows = await asyncio.to_thread(
                    self._decoders[raw].generate, texts, params.max_tokens,
                    temperature=params.temperature, top_p=params.top_p,
                    seed=params.seed,
                    stop=params.stop, combine=mode, weights=weights,
                    top_logprobs=params.logprobs or 0)
            share = (time.perf_counter() - t0) / len(rows)
            for i, row in zip(idx, rows, strict=True):
                out[i] = self._generation(row, params, share)
        assert all(g is not None for g in out)
        return out

    def _generation(self, row: dict, params: SamplingParams, seconds: float) -> Generation:
        lps = None
        if params.logprobs is not None:
            lps = [TokenLogprobs(token_id=e["token_id"], logprob=e["logprob"],
                                 top=e.get("top", {})) for e in row["logprobs"]]
        return Generation(text=row["text"], token_ids=row["token_ids"],
                          finish_reason=row["finish_reason"], prompt_tokens=row["prompt_tokens"],
                          completion_tokens=row["completion_tokens"], logprobs=lps,
                          model=self.name, version=0, engine_seconds=seconds)
