"""The API-key and tenant-limit middleware for an OpenAI app rayplane does not route itself
(Ray's vLLM ingress): in front of a stand-in OpenAI server that answers as vLLM does (usage
in the JSON body; in a last stream chunk only when ``stream_options.include_usage``). Keys
are test fixtures, not secrets."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from serve.middleware import TenantMiddleware, body_reservation

TEAM_A = "rp-test-mw-team-a"  # pragma: allowlist secret
PLATFORM = "rp-test-mw-platform"  # pragma: allowlist secret
USAGE = {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40}


def openai_server(seen: list) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        if not body.get("stream"):
            return JSONResponse({"object": "chat.completion", "choices": [], "usage": USAGE})

        async def events():
            for text in ("Hel", "lo"):
                yield "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": text}}]}, separators=(",", ":")) + "\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [],
                                             "usage": USAGE}, separators=(",", ":")) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    @app.get("/health")
    async def health():
        return {"ok": True}
    return app


@pytest.fixture()
def served(tmp_path):
    (tmp_path / "a").write_text(TEAM_A + "\n")
    (tmp_path / "platform").write_text(PLATFORM + "\n")
    seen: list = []
    app = openai_server(seen)
    app.add_middleware(TenantMiddleware, api_keys={"file": str(tmp_path / "platform")},
                       limits={"tenants": [{"name": "team-a",
                                            "api_keys": {"file": str(tmp_path / "a")},
                                            "requests_per_minute": 3}],
                               "default": {"tokens_per_minute": 100}, "replicas": 1})
    client = TestClient(app)
    client.get("/health")  # builds the middleware stack

    def middleware() -> TenantMiddleware:
        layer = app.middleware_stack
        while not isinstance(layer, TenantMiddleware):
            layer = layer.app
        return layer
    return client, seen, middleware()


def chat(client, key: str, **body):
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                             **body})


def test_keys_are_checked_on_v1_only(served):
    client, _, _ = served
    assert client.get("/health").status_code == 200
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert chat(client, "rp-wrong").json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {PLATFORM}"}).json() \
        == {"object": "list", "data": []}


def test_a_tenant_over_its_requests_per_minute_gets_429(served):
    client, _, _ = served
    assert [chat(client, TEAM_A).status_code for _ in range(4)] == [200, 200, 200, 429]
    r = chat(client, TEAM_A)
    assert r.headers["retry-after"] == "20"
    assert r.json()["error"] == {"message": "Rate limit reached for team-a on requests per "
                                            "minute (RPM): limit 3. Please try again in 20s.",
                                 "type": "requests", "param": None,
                                 "code": "rate_limit_exceeded"}
    assert chat(client, PLATFORM).status_code == 200  # another budget


def test_tokens_are_counted_from_bodies_and_hidden_stream_usage(served):
    client, seen, mw = served
    name = mw.keys.identify(PLATFORM).name
    level = lambda: mw.limiter.remaining(name)["tokens"]  # noqa: E731
    start = level()
    assert chat(client, PLATFORM, max_tokens=10).json()["usage"] == USAGE
    assert level() == pytest.approx(start - 40, abs=0.5)
    r = chat(client, PLATFORM, stream=True)
    # The server was asked for usage; this client, which did not ask, does not see it.
    assert seen[-1]["stream_options"] == {"include_usage": True}
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 3
    assert all("usage" not in e for e in events)
    assert level() == pytest.approx(start - 80, abs=0.5)
    asked = chat(client, PLATFORM, stream=True, stream_options={"include_usage": True})
    assert '"usage":{' in asked.text
    assert level() == pytest.approx(start - 120, abs=0.5)
    refused = chat(client, PLATFORM)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"


def test_the_reservation_of_a_raw_body():
    chat_path, text_path = "/v1/chat/completions", "/v1/completions"
    assert body_reservation(chat_path, {"max_tokens": 7, "n": 3}) == 21
    assert body_reservation(chat_path, {"max_completion_tokens": 5}) == 5
    assert body_reservation(chat_path, {}) == 0
    assert body_reservation(text_path, {"prompt": "a"}) == 16  # OpenAI's default
    assert body_reservation(text_path, {"prompt": ["a", "b"], "max_tokens": 4, "n": 2}) == 16
    assert body_reservation(text_path, {"prompt": [1, 2, 3], "max_tokens": 4}) == 4
    for bad in (None, [], {"max_tokens": "many"}, {"max_tokens": -1}, {"n": "2", "max_tokens": 2}):
        assert body_reservation(chat_path, bad) == 0
