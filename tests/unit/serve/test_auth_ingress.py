"""The ingress's request path with tenants, in-process: the real ``OpenAIIngress`` FastAPI
routes and the real CPU engine inside it (as in ``ingress.mode: direct``), driven over HTTP
by FastAPI's test client, with Serve's replica context pointed at this instance. Keys are
test fixtures, not secrets."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from ray import serve

from serve import ingress
from tests.support import tiny_model as tm

TEAM_A = "rp-test-ingress-team-a"  # pragma: allowlist secret
TEAM_B = "rp-test-ingress-team-b"  # pragma: allowlist secret
PLATFORM = "rp-test-ingress-platform"  # pragma: allowlist secret
BODY = {"model": "tiny", "messages": tm.GREETING, "temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    for name, key in (("a", TEAM_A), ("b", TEAM_B), ("platform", PLATFORM)):
        (folder / name).write_text(key + "\n")
    limits = {"tenants": [
        {"name": "team-a", "api_keys": {"file": str(folder / "a")}, "requests_per_minute": 3},
        {"name": "team-b", "api_keys": {"file": str(folder / "b")}, "requests_per_minute": 600}],
        "default": {"tokens_per_minute": 1000}, "replicas": 1}
    model = {"name": "tiny", "source": str(tiny_model), "max_num_seqs": 4, "threads": 1,
             "stream_interval_ms": 0, "deployment": "model-tiny"}
    cls = ingress.OpenAIIngress.func_or_class.__mro__[1]  # the class under @serve.ingress
    instance = cls.__new__(cls)
    cls.__init__(instance, None, {"file": str(folder / "platform")}, in_replica=model,
                 limits=limits)
    instance.limiter.clock = lambda: 1000.0  # frozen: no refill between the tests' checks

    class Context:
        servable_object = instance

    mp = pytest.MonkeyPatch()
    mp.setattr(serve, "get_replica_context", lambda: Context)
    yield TestClient(ingress.api), instance
    mp.undo()


def post(client, key: str, **body):
    return client.post("/v1/chat/completions", json={**BODY, **body},
                       headers={"Authorization": f"Bearer {key}"})


def test_a_tenant_over_its_limit_gets_429_and_the_other_does_not(app):
    client, _ = app
    codes = [post(client, TEAM_A).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    refused = post(client, TEAM_A)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "20"  # 3 per minute: one every 20 s
    assert refused.json() == {"error": {
        "message": "Rate limit reached for team-a on requests per minute (RPM): limit 3. "
                   "Please try again in 20s.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    assert all(post(client, TEAM_B).status_code == 200 for _ in range(5))
    # GET /v1/models counts as a request of its tenant too.
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {TEAM_A}"})
    assert models.status_code == 429
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {TEAM_B}"}).json()[
        "data"][0]["id"] == "tiny"


def test_refused_and_invalid_requests_cost_nothing(app):
    client, instance = app
    assert post(client, "rp-nope").status_code == 401
    assert post(client, TEAM_B, temperature=7).status_code == 400
    assert post(client, TEAM_B, model="gpt-4o").status_code == 404
    name = instance.keys.identify(PLATFORM).name
    before = instance.limiter.remaining(name)["tokens"]
    # Refused by the engine (over the context): the reservation is given back.
    too_long = post(client, PLATFORM, max_tokens=100000)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    assert instance.limiter.remaining(name)["tokens"] == pytest.approx(before)


def events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_tokens_are_counted_from_responses_and_streams_alike(app):
    client, instance = app
    name = instance.keys.identify(PLATFORM).name
    assert name.startswith("key-") and PLATFORM not in name
    start = instance.limiter.remaining(name)["tokens"]
    used = post(client, PLATFORM).json()["usage"]["total_tokens"]
    after_one = instance.limiter.remaining(name)["tokens"]
    assert after_one == pytest.approx(start - used)
    # A stream whose client did not ask for usage: counted from the usage chunk the
    # ingress asked for, which the client never sees.
    streamed = post(client, PLATFORM, stream=True)
    assert streamed.status_code == 200
    chunks = events(streamed.text)
    assert chunks[-1] == "[DONE]"
    assert all("usage" not in c and c["choices"] for c in chunks[:-1])
    assert instance.limiter.remaining(name)["tokens"] == pytest.approx(after_one - used)
    # A client that asked for usage gets it, the same count.
    asked = events(post(client, PLATFORM, stream=True,
                        stream_options={"include_usage": True}).text)
    assert asked[-2]["choices"] == [] and asked[-2]["usage"]["total_tokens"] == used
    assert all(c["usage"] is None for c in asked[:-2])


def test_past_its_tokens_per_minute_a_key_gets_429_for_tokens(app):
    client, instance = app
    name = instance.keys.identify(PLATFORM).name
    sent = 0
    while post(client, PLATFORM, max_tokens=8).status_code == 200:
        sent += 1
        assert sent < 100
    refused = post(client, PLATFORM, max_tokens=8)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    assert name in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 3  # < 8 + usage tokens at 1000/min
    assert post(client, TEAM_B).status_code == 200


def test_no_key_reaches_a_log(app, caplog):
    client, _ = app
    with caplog.at_level(logging.DEBUG):
        for key in (TEAM_A, TEAM_B, PLATFORM, "rp-test-unknown-key"):
            post(client, key, metadata={"x": 1})  # an unknown field is logged, by name
    assert "metadata" in caplog.text
    for key in (TEAM_A, TEAM_B, PLATFORM, "rp-test-unknown-key"):
        assert key not in caplog.text
