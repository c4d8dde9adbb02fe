"""HFEngine: the Engine protocol over transformers, with micro-batching of concurrent calls.

Concurrent `generate` calls that arrive within `batch_window_ms` of each other share one batched
forward pass (left padding + attention mask, our own KV-cached decode loop so every row keeps its
own sampling params). Model work runs in a worker thread, so the event loop stays free.

Both engines tokenize with the same transformers tokenizer (`moco_ray.models.tokenizer`), so
they see the same token ids for the same prompt.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moco_ray.config import EngineSpec
from moco_ray.models.checkpoint import checkpoint_shapes, validate_checkpoint
from moco_ray.models.paths import local_model_dir
from moco_ray.models.tokenizer import (
    cut_at_stop,
    encode_continuation,
    encode_prompt,
    eos_token_ids,
    render_prompt,
)
from moco_ray.records import Generation, Prompt, SamplingParams, Score, TokenLogprobs


# ---------------------------------------------------------------------------------------------
# HFEngine
# ---------------------------------------------------------------------------------------------
@dataclass
class _Request:
    ids: list[list[int]]
    params: SamplingParams
    future: asyncio.Future
    start: float = field(default_factory=time.perf_counter)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine:
    """Engine over a transformers causal LM. engine_kwargs: `max_batch_size` (rows per forward,
    default 32) and `batch_window_ms` (how long the first request waits for company, default 5)."""

    def __init__(self, spec: EngineSpec):
        opts = dict(spec.engine_kwargs)
        self.max_batch_size = int(opts.pop("max_batch_size", 32))
        self.batch_window_s = float(opts.pop("batch_window_ms", 5.0)) / 1000
        if opts:
            raise ValueError(f"unknown engine_kwargs for the hf engine: {sorted(opts)}; "
                             "valid: max_batch_size, batch_window_ms")
        if spec.dtype != "auto" and spec.dtype not in _DTYPES:
            raise ValueError(f"dtype {spec.dtype!r} is not one of 'auto', {sorted(_DTYPES)}")
        self.spec = spec
        self.version = 0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        self.model = AutoModelForCausalLM.from_pretrained(
            spec.model, dtype=_DTYPES.get(spec.dtype, "auto")).to(self.device).eval()
        self._reference = checkpoint_shapes(local_model_dir(spec.model))
        self._eos = eos_token_ids(self.tokenizer, str(local_model_dir(spec.model)))
        self._pad = self.tokenizer.pad_token_id
        if self._pad is None:
            self._pad = next(iter(self._eos), 0)
        self._lock = threading.Lock()  # one forward pass or weight load at a time
        self._rng = torch.Generator().manual_seed(spec.seed)  # for requests without a seed
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.stats = {"batches": 0, "requests": 0, "rows": 0}  # micro-batching at work

    # -- protocol -------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    async def generate(self, prompts: list[Prompt], params: SamplingParams,
                       lora: str | None = None) -> list[Generation]:
        if lora is not None:
            raise ValueError(f"the hf engine serves no LoRA adapters (asked for {lora!r}); "
                             "use engine 'vllm' with enable_lora")
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        for i in ids:
            if len(i) >= self.spec.max_model_len:
                raise ValueError(f"prompt of {len(i)} tokens does not fit max_model_len="
                                 f"{self.spec.max_model_len}; shorten it or raise max_model_len")
        if not ids:
            return []
        self._ensure_worker()
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(ids, params, fut))
        return await fut

    async def score(self, prompt: Prompt, continuations: list[str],
                    lora: str | None = None) -> list[Score]:
        if lora is not None:
            raise ValueError(f"the hf engine serves no LoRA adapters (asked for {lora!r}); "
                             "use engine 'vllm' with enable_lora")
        p_ids = encode_prompt(self.tokenizer, prompt)
        seqs = [p_ids + encode_continuation(self.tokenizer, c) for c in continuations]
        if not seqs:
            return []
        return await asyncio.to_thread(self._score, len(p_ids), seqs)

    async def load_weights(self, path: str) -> int:
        validate_checkpoint(self._reference, path)
        return await asyncio.to_thread(self._load, path)

    async def shutdown(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            if worker.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(worker, return_exceptions=True)  # let it unwind

    # -- micro-batching ---------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        # A new event loop (e.g. a fresh asyncio.run) needs its own queue and worker.
        if self._worker is None or self._worker.get_loop() is not loop or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Wait a moment for company, then take what came (sleep + get_nowait: wait_for on
            # Queue.get can drop an item on timeout in Python 3.11).
            await asyncio.sleep(self.batch_window_s)
            while not self._queue.empty() and (
                    sum(len(r.ids) for r in batch) < self.max_batch_size):
                batch.append(self._queue.get_nowait())
            rows = [(i, r.params) for r in batch for i in r.ids]
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["rows"] += len(rows)
            try:
                gens = await asyncio.to_thread(self._generate_rows, rows)
            except Exception as e:  # noqa: BLE001 - handed to every caller of this batch
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            now = time.perf_counter()
            for r in batch:
                mine, gens = gens[:len(r.ids)], gens[len(r.ids):]
                for g in mine:
                    g.engine_seconds = now - r.start
                if not r.future.done():  # the caller may have been cancelled
                    r.future.set_result(mine)

    # -- model work (worker thread) ---------------------------------------------------------------
    def _generate_rows(self, rows: list[tuple[list[int], SamplingParams]]) -> list[Generation]:
        out: list[Generation] = []
        for s in range(0, len(rows), self.max_batch_size):
            out += self._decode(rows[s:s + self.max_batch_size])
        return out

    @torch.inference_mode()
    def _decode(self, rows: list[tuple[list[int], SamplingParams]]) -> list[Generation]:
        from transformers import DynamicCache

        with self._lock:
            version = self.version
            n, width = len(rows), max(len(ids) for ids, _ in rows)
            ids = torch.full((n, width), self._pad, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for b, (p, _) in enumerate(rows):  # left padding: every row ends at the same column
                ids[b, width - len(p):] = torch.tensor(p)
                mask[b, width - len(p):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else self._rng
                    for _, p in rows]
            limits = [min(p.max_tokens, self.spec.max_model_len - len(i)) for i, p in rows]
            new: list[list[int]] = [[] for _ in rows]
            lps: list[list[TokenLogprobs]] = [[] for _ in rows]
            finish: list[str | None] = [None] * n
            texts: list[str | None] = [None] * n
            cache = DynamicCache(config=self.model.config)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            for _ in range(max(limits)):
                # Logprobs of the raw logits (vLLM's default 'raw_logprobs' mode).
                logprobs = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
                chosen = logprobs.argmax(-1).tolist()
                for b, (_, p) in enumerate(rows):
                    if finish[b] is not None:
                        continue
                    if p.temperature > 0:
                        chosen[b] = _sample(logprobs[b], p, gens[b])
                    tok = chosen[b]
                    new[b].append(tok)
                    if p.logprobs is not None:
                        top = {}
                        if p.logprobs:
                            k = torch.topk(logprobs[b], p.logprobs)
                            top = dict(zip(k.indices.tolist(), k.values.tolist()))
                        lps[b].append(TokenLogprobs(token_id=tok, top=top,
                                                    logprob=logprobs[b, tok].item()))
                    if tok in self._eos:
                        finish[b] = "stop"
                    elif p.stop and (cut := cut_at_stop(self._text(new[b]), p.stop)) is not None:
                        finish[b], texts[b] = "stop", cut
                    elif len(new[b]) >= limits[b]:
                        finish[b] = "length"
                if all(f is not None for f in finish):
                    break
                step = torch.tensor(chosen, device=self.device).unsqueeze(-1)
                mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
                pos = pos[:, -1:] + 1
                logits = self.model(input_ids=step, attention_mask=mask, position_ids=pos,
                                    past_key_values=cache, use_cache=True).logits
        return [Generation(
            text=texts[b] if texts[b] is not None else self._text(new[b]), token_ids=new[b],
            finish_reason=finish[b], prompt_tokens=len(rows[b][0]),
            completion_tokens=len(new[b]), logprobs=lps[b] if rows[b][1].logprobs is not None
            else None, model=self.spec.model, version=version) for b in range(n)]

    def _text(self, ids: list[int]) -> str:
        # A trailing U+FFFD is an unfinished multi-byte character; vLLM's incremental
        # detokenizer holds those back, so the two engines return the same text.
        return self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")

    @torch.inference_mode()
    def _score(self, prompt_len: int, seqs: list[list[int]]) -> list[Score]:
        with self._lock:
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, s in enumerate(seqs):  # right padding: positions line up with the prompt
                ids[b, :len(s)] = torch.tensor(s)
                mask[b, :len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
            out = []
            for b, s in enumerate(seqs):
                # Row t of the logits predicts token t+1.
                lp = torch.log_softmax(logits[b, prompt_len - 1:len(s) - 1].float(), dim=-1)
                target = torch.tensor(s[prompt_len:], device=lp.device)
                tok = lp.gather(-1, target[:, None]).squeeze(-1)
                out.append(Score(sum_logprob=tok.sum().item(), mean_logprob=tok.mean().item(),
                                 num_tokens=len(target)))
        return out

    def _load(self, path: str) -> int:
        from safetensors.torch import load_file

        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(path).glob("*.safetensors")):  # read everything before touching
            tensors.update(load_file(str(f)))
        state = self.model.state_dict()
        with self._lock, torch.no_grad():
            for name, t in tensors.items():
                state[name].copy_(t)  # in place: tied weights and KV-free state stay shared
            self.version += 1
            return self.version


def _sample(logprobs: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """Temperature + nucleus (top_p) sampling of one row."""
    probs = torch.softmax(logprobs / p.temperature, dim=-1).cpu()
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen).item())
