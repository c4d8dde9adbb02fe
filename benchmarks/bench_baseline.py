"""`ReloadPerCallClient`: the benchmark baseline, a PoolClient that keeps no model in memory.

Every call loads what it needs from disk with transformers (tokenizer with its chat template,
`AutoModelForCausalLM.from_pretrained`), generates or scores, and frees it (`del` + `gc.collect`)
before returning: the way the MoCo reference library runs its models (load a model, run its
prompts, delete it). It returns the same `Generation` / `Score` records as the pool, so any
strategy runs on it unchanged. The needs a one-model-per-deployment baseline lacks get their
per-call equivalent:

- `lora`: load the base model, then the peft adapter dir on top of it;
- `generate_with` (a weight-level candidate): load the weights dir named by the call;
- `fused_generate` (logit level): load every member of the group and decode them in lockstep
  with `moco_ray.engines.lockstep.LockstepDecoder`.

Calls run one at a time (`max_concurrent`, default 1: one model loaded at once, as the reference
does on one device), each in a worker thread so the event loop stays free. Nothing here uses
Ray or Serve.
"""
from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import torch

from moco_ray.models.tokenizer import (
    cut_at_stop,
    encode_continuation,
    encode_prompt,
    eos_token_ids,
    render_prompt,
)
from moco_ray.records import Generation, Prompt, SamplingParams, Score, TokenLogprobs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReloadPerCallClient:
    """PoolClient over model dirs, loading per call. `paths`: member name -> weights dir;
    `groups`: logit group name -> its member names (in fusion-weight order); `scratch`: scratch
    deployment name -> weights dir it starts from (its tokenizer serves candidates that ship
    none)."""

    def __init__(self, paths: dict[str, str], groups: dict[str, list[str]] | None = None,
                 scratch: dict[str, str] | None = None, dtype: str = "float32",
                 device: str | None = None, max_concurrent: int = 1):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        self.paths = dict(paths)
        self.groups = {g: list(ms) for g, ms in (groups or {}).items()}
        for g, ms in self.groups.items():
            missing = [m for m in ms if m not in self.paths]
            if missing:
                raise ValueError(f"logit group {g!r} names unknown models {missing}; models: "
                                 f"{sorted(self.paths)}")
        self.scratch = dict(scratch or {})
        self.models = list(self.paths)
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_concurrent = max_concurrent
        self._sems: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        # What the benchmark and the tests look at: loads done, and a weak reference to the last
        # model loaded (dead once the call returns, if the model was really freed).
        self.loads = 0
        self.load_seconds = 0.0
        self.last_model: weakref.ref | None = None
        self._render_tokenizers: dict[str, object] = {}

    # -- PoolClient ------------------------------------------------------------------------------
    async def generate(self, model: str, prompts: list[Prompt], params: SamplingParams,
                       lora: str | None = None) -> list[Generation]:
        path = self._path(model)
        return await self._run(self._generate, model, path, path, prompts, params, lora)

    async def score(self, model: str, prompt: Prompt, continuations: list[str],
                    lora: str | None = None) -> list[Score]:
        path = self._path(model)
        return await self._run(self._score, path, prompt, continuations, lora)

    async def generate_with(self, scratch: str, weights: str, prompts: list[Prompt],
                            params: SamplingParams) -> list[Generation]:
        if scratch not in self.scratch:
            raise KeyError(f"unknown scratch deployment {scratch!r}; scratch: "
                           f"{sorted(self.scratch)}")
        tok = weights if _has_tokenizer(weights) else self.scratch[scratch]
        return await self._run(self._generate, scratch, weights, tok, prompts, params, None)

    async def weights_path(self, model: str) -> str:
        return self._path(model)  # never swapped: the baseline serves the start weights

    async def fused_generate(self, group: str, prompts: list[Prompt], params: SamplingParams,
                             mode: str, weights: list[float]) -> list[Generation]:
        if group not in self.groups:
            raise KeyError(f"unknown logit group {group!r}; groups: {sorted(self.groups)}")
        return await self._run(self._fused, group, prompts, params, mode, weights)

    def render(self, model: str, prompt: Prompt) -> str:
        # Rendering needs the tokenizer's chat template only (no model); kept per model.
        path = self._path(model)
        tok = self._render_tokenizers.get(path)
        if tok is None:
            from transformers import AutoTokenizer

            tok = self._render_tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return render_prompt(tok, prompt)

    # -- plumbing ----------------------------------------------------------------------------
    def _path(self, model: str) -> str:
        try:
            return self.paths[model]
        except KeyError:
            raise KeyError(f"unknown model {model!r}; models: {sorted(self.paths)}") from None

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        sem = self._sems.get(loop)
        if sem is None:
            sem = self._sems[loop] = asyncio.Semaphore(self.max_concurrent)
        async with sem:
            return await asyncio.to_thread(fn, *args)

    def _load(self, weights: str, tokenizer_dir: str, lora: str | None = None):
        """Tokenizer + model from disk, now (the per-call cost this baseline stands for)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=self.dtype).to(self.device)
        if lora is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, lora)
        model.eval()
        self.loads += 1
        self.load_seconds += time.perf_counter() - t0
        self.last_model = weakref.ref(model)
        return tok, model

    @staticmethod
    def _free() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- work (worker thread) ------------------------------------------------------------------
    def _generate(self, name: str, weights: str, tokenizer_dir: str, prompts: list[Prompt],
                  params: SamplingParams, lora: str | None) -> list[Generation]:
        t0 = time.perf_counter()
        tok, model = self._load(weights, tokenizer_dir, lora)
        try:
            eos = eos_token_ids(tok, tokenizer_dir) | eos_token_ids(tok, weights)
            out = [self._decode_one(tok, model, eos, p, params) for p in prompts]
        finally:
            del model, tok
            self._free()
        seconds = time.perf_counter() - t0
        return [g.model_copy(update={"model": name, "engine_seconds": seconds / len(out)})
                for g in out]

    @torch.inference_mode()
    def _decode_one(self, tok, model, eos: set[int], prompt: Prompt,
                    params: SamplingParams) -> Generation:
        """One prompt, KV-cached: greedy (argmax of the raw logits) or temperature + top_p
        sampling with the request's seed; stops at EOS, a stop string or max_tokens."""
        ids = encode_prompt(tok, prompt)
        limit = params.max_tokens
        ctx_len = getattr(model.config, "max_position_embeddings", None)
        if ctx_len is not None:
            limit = min(limit, ctx_len - len(ids))
            if limit < 1:
                raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the model's "
                                 f"context of {ctx_len}")
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
        out = model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        cache = out.past_key_values
        new: list[int] = []
        lps: list[TokenLogprobs] = []
        finish, text = "length", None
        for _ in range(limit):
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            if params.temperature > 0:
                t = _sample(logprobs, params, gen)
            else:
                t = int(logprobs.argmax())
            new.append(t)
            if params.logprobs is not None:
                top = {}
                if params.logprobs:
                    k = torch.topk(logprobs, params.logprobs)
                    top = dict(zip(k.indices.tolist(), k.values.tolist()))
                lps.append(TokenLogprobs(token_id=t, logprob=logprobs[t].item(), top=top))
            if t in eos:
                finish = "stop"
                break
            if params.stop and (cut := cut_at_stop(_text(tok, new), params.stop)) is not None:
                finish, text = "stop", cut
                break
            out = model(input_ids=torch.tensor([[t]], device=self.device),
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        return Generation(text=text if text is not None else _text(tok, new), token_ids=new,
                          finish_reason=finish, prompt_tokens=len(ids),
                          completion_tokens=len(new),
                          logprobs=lps if params.logprobs is not None else None)

    @torch.inference_mode()
    def _score(self, path: str, prompt: Prompt, continuations: list[str],
               lora: str | None) -> list[Score]:
        tok, model = self._load(path, path, lora)
        try:
            p_ids = encode_prompt(tok, prompt)
            scores = []
            for c in continuations:
                seq = p_ids + encode_continuation(tok, c)
                logits = model(input_ids=torch.tensor([seq], device=self.device)).logits[0]
                lp = torch.log_softmax(logits[len(p_ids) - 1:len(seq) - 1].float(), dim=-1)
                target = torch.tensor(seq[len(p_ids):], device=lp.device)
                tk = lp.gather(-1, target[:, None]).squeeze(-1)
                scores.append(Score(sum_logprob=tk.sum().item(), mean_logprob=tk.mean().item(),
                                    num_tokens=len(target)))
        finally:
            del model, tok
            self._free()
        return scores

    def _fused(self, group: str, prompts: list[Prompt], params: SamplingParams, mode: str,
               weights: list[float]) -> list[Generation]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moco_ray.engines.lockstep import LockstepDecoder

        members = self.groups[group]
        if weights is not None and len(weights) != len(members):
            raise ValueError(f"logit group {group!r} has {len(members)} models {members}; got "
                             f"{len(weights)} weights, give one per model")
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(self.paths[members[0]])
        models = [AutoModelForCausalLM.from_pretrained(self.paths[m], dtype=self.dtype)
                  .to(self.device).eval() for m in members]
        self.loads += len(models)
        self.load_seconds += time.perf_counter() - t0
        self.last_model = weakref.ref(models[-1])
        out: list[Generation] = []
        try:
            for p in prompts:
                dec = LockstepDecoder(models, tok, add_special_tokens=isinstance(p, str))
                [row] = dec.generate([render_prompt(tok, p)], params.max_tokens,
                                     temperature=params.temperature, top_p=params.top_p,
                                     seed=params.seed, stop=params.stop, combine=mode,
                                     weights=weights, top_logprobs=params.logprobs or 0)
                del dec
                lps = None
                if params.logprobs is not None:
                    lps = [TokenLogprobs(token_id=e["token_id"], logprob=e["logprob"],
                                         top=e.get("top", {})) for e in row["logprobs"]]
                out.append(Generation(text=row["text"], token_ids=row["token_ids"],
                                      finish_reason=row["finish_reason"],
                                      prompt_tokens=row["prompt_tokens"],
                                      completion_tokens=row["completion_tokens"], logprobs=lps,
                                      model=group))
        finally:
            del models, tok
            self._free()
        seconds = time.perf_counter() - t0
        return [g.model_copy(update={"engine_seconds": seconds / len(out)}) for g in out]


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def _sample(logprobs: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    probs = torch.softmax(logprobs / p.temperature, dim=-1).cpu()
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        sorted_p[sorted_p.cumsum(-1) - sorted_p >= p.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _has_tokenizer(path: str) -> bool:
    d = Path(path)
    return any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                          "tokenizer.model"))
