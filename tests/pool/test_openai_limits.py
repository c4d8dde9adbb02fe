"""Limits of the OpenAI routes: prompt count, max_tokens bound, timeout, API key; and the pool
config that sets them. Routes run in-process on the Serve-transformed FastAPI app over a fake
server (no Ray): Serve hands the routes the replica's instance through
`serve.get_replica_context()`, which the tests point at the fake."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from ray import serve

import moco_ray.pool.server  # noqa: F401  (its serve.ingress binds the routes to a server)
from moco_ray.config import ModelSpec, PoolConfig
from moco_ray.pool.openai_api import OpenAILimits, OpenAIRoutes, openai_app
from moco_ray.records import Generation, SamplingParams

KEY = "sk-test-0123456789"
MODELS = [{"name": "m", "path": "zoo:tiny", "max_model_len": 256}]


class FakeServer(OpenAIRoutes):
    """What the routes call on a ModelServer; records each generate call."""

    def __init__(self, limits: OpenAILimits | None = None, delay_s: float = 0.0):
        self.name, self.model_path = "m", "/models/m"
        self.openai_limits = limits or OpenAILimits()
        self.delay_s = delay_s
        self.calls: list[tuple[list, SamplingParams]] = []
        self.cancelled = False

    async def generate(self, prompts, params):
        self.calls.append((prompts, params))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return [Generation(text="ok", token_ids=[1], finish_reason="stop", prompt_tokens=2,
                           completion_tokens=1, model=self.name, version=1) for _ in prompts]

    def decode_token(self, token_id: int) -> str:
        return "ok"


@pytest.fixture
def serve_as(monkeypatch):
    """A test client whose requests reach `server` as the replica's instance."""
    def _client(server: FakeServer) -> TestClient:
        monkeypatch.setattr(serve, "get_replica_context",
                            lambda: SimpleNamespace(servable_object=server))
        return TestClient(openai_app)
    return _client


@pytest.fixture
def no_env_key(monkeypatch):
    monkeypatch.delenv("MOCO_RAY_API_KEY", raising=False)


def _error(r) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "my-host.example"])
def test_non_loopback_host_without_key_is_refused(no_env_key, host):
    with pytest.raises(ValueError, match="MOCO_RAY_API_KEY") as e:
        PoolConfig(models=MODELS, http_host=host)
    assert "127.0.0.1" in str(e.value)  # the message names both fixes


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_host_needs_no_key(no_env_key, host):
    assert PoolConfig(models=MODELS, http_host=host).resolved_api_key() is None


def test_key_from_config_or_env(monkeypatch, no_env_key):
    assert PoolConfig(models=MODELS, http_host="0.0.0.0", api_key=KEY).resolved_api_key() == KEY
    monkeypatch.setenv("MOCO_RAY_API_KEY", "from-env")
    cfg = PoolConfig(models=MODELS, http_host="0.0.0.0")
    assert cfg.resolved_api_key() == "from-env"
    # the config's key wins over the env's; an empty env var counts as unset
    assert PoolConfig(models=MODELS, api_key=KEY).resolved_api_key() == KEY
    monkeypatch.setenv("MOCO_RAY_API_KEY", "")
    assert PoolConfig(models=MODELS).resolved_api_key() is None


def test_key_never_in_dumps_or_repr(no_env_key):
    cfg = PoolConfig(models=MODELS, http_host="0.0.0.0", api_key=KEY)
    # dumps feed saved configs and job fingerprints: the secret must not reach them
    assert KEY not in repr(cfg) and KEY not in cfg.model_dump_json()
    assert "api_key" not in cfg.model_dump(mode="json")
    assert KEY not in repr(OpenAILimits.for_model(cfg, cfg.models[0]))


def test_limits_for_model(monkeypatch, no_env_key):
    spec = ModelSpec(name="m", path="zoo:tiny", max_model_len=256)
    cfg = PoolConfig(models=[spec], max_prompts_per_request=4, request_timeout_s=9.0)
    lim = OpenAILimits.for_model(cfg, spec)
    assert (lim.api_key, lim.max_prompts, lim.max_tokens, lim.timeout_s) == (None, 4, 256, 9.0)
    # a smaller bound is kept; a larger one is capped by the context
    assert OpenAILimits.for_model(cfg.model_copy(update={"max_tokens_limit": 32}),
                                  spec).max_tokens == 32
    assert OpenAILimits.for_model(cfg.model_copy(update={"max_tokens_limit": 5000}),
                                  spec).max_tokens == 256
    # the key is read at pool start: a key that left the env since the config loaded is missed
    monkeypatch.setenv("MOCO_RAY_API_KEY", KEY)
    open_cfg = PoolConfig(models=[spec], http_host="0.0.0.0")
    assert OpenAILimits.for_model(open_cfg, spec).api_key == KEY
    monkeypatch.delenv("MOCO_RAY_API_KEY")
    with pytest.raises(ValueError, match="not loopback"):
        OpenAILimits.for_model(open_cfg, spec)


# --- routes: prompt count and max_tokens -------------------------------------------------------


def test_prompt_list_is_bounded(serve_as):
    server = FakeServer(OpenAILimits(max_prompts=3))
    client = serve_as(server)
    ok = client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b", "c"]})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
    r = client.post("/v1/completions", json={"model": "m", "prompt": ["a"] * 4})
    err = _error(r)
    assert r.status_code == 400 and err["param"] == "prompt" and err["code"] == "too_many_prompts"
    assert "4 prompts" in err["message"] and "at most 3" in err["message"]
    r = client.post("/v1/completions", json={"model": "m", "prompt": []})
    assert r.status_code == 400 and "empty" in _error(r)["message"]
    assert len(server.calls) == 1  # refused requests never reach the engine


def test_max_tokens_is_bounded(serve_as):
    server = FakeServer(OpenAILimits(max_tokens=100))
    client = serve_as(server)
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 101})
    err = _error(r)
    assert r.status_code == 400 and err["param"] == "max_tokens"
    assert "limit of 100" in err["message"] and "max_tokens<=100" in err["message"]
    # chat names the field the client sent
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 500})
    assert r.status_code == 400 and _error(r)["param"] == "max_completion_tokens"
    ok = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 100})
    assert ok.status_code == 200 and server.calls[-1][1].max_tokens == 100


@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_max_tokens_is_a_400(serve_as, value):
    client = serve_as(FakeServer())
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": value})
    assert r.status_code == 400 and "max_tokens" in _error(r)["message"]


def test_default_max_tokens_respects_a_low_bound(serve_as):
    server = FakeServer(OpenAILimits(max_tokens=16))
    serve_as(server).post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert server.calls[-1][1].max_tokens == 16
    server = FakeServer(OpenAILimits(max_tokens=1000))
    serve_as(server).post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert server.calls[-1][1].max_tokens == SamplingParams().max_tokens


# --- routes: timeout ---------------------------------------------------------------------------


def test_slow_generation_times_out_with_504_and_is_cancelled(serve_as):
    server = FakeServer(OpenAILimits(timeout_s=0.05), delay_s=30)
    client = serve_as(server)
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    err = _error(r)
    assert r.status_code == 504 and err["code"] == "timeout" and "0.05 s" in err["message"]
    assert server.cancelled
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 504


# --- routes: API key ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_key_is_a_401(serve_as, headers):
    client = serve_as(FakeServer(OpenAILimits(api_key=KEY)))
    for method, path, body in [("get", "/v1/models", None),
                               ("post", "/v1/completions", {"model": "m", "prompt": "x"})]:
        r = client.request(method, path, json=body, headers=headers)
        err = _error(r)
        assert r.status_code == 401 and err["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer" and KEY not in err["message"]


def test_key_is_checked_before_the_body(serve_as):
    server = FakeServer(OpenAILimits(api_key=KEY))
    client = serve_as(server)
    # neither a validation error nor a 404 naming the served model reaches a caller without key
    for body in [{"model": "m"}, {"model": "other", "prompt": "x"}]:
        assert client.post("/v1/completions", json=body).status_code == 401
    assert client.post("/v1/completions", json={"model": "other", "prompt": "x"}, headers={
        "Authorization": f"Bearer {KEY}"}).status_code == 404
    assert not server.calls


def test_right_key_or_no_key_passes(serve_as):
    client = serve_as(FakeServer(OpenAILimits(api_key=KEY)))
    for scheme in ("Bearer", "bearer"):
        r = client.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
    assert serve_as(FakeServer()).get("/v1/models").status_code == 200
