"""An ``openai-upstream`` model behind the real ``OpenAIIngress`` routes, in-process (router
mode's constructor, the model deployment's class called in this process instead of through a
Serve handle), over HTTP with FastAPI's test client: the ingress maps the proxy's errors, lists
its card and passes its stream through. The upstreams: the session's ``transformers serve`` and
a port where nothing listens."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from ray import serve

from serve import ingress
from serve.engines.upstream import UpstreamModelServer
from serve.model_server import InReplicaModel
from tests.support.upstream import free_port

HELLO = [{"role": "user", "content": "hello"}]


def upstream_model(name: str, base_url: str, upstream_name: str) -> dict:
    return {"name": name, "source": f"upstream:{name}", "engine": "openai-upstream",
            "deployment": f"model-{name}",
            "upstream": {"base_url": base_url, "model": upstream_name, "api_key": None,
                         "connect_timeout_s": 1, "read_timeout_s": 60, "retries": 1}}


@pytest.fixture(scope="module")
def client(upstream_server):
    down_port = free_port()
    models = {
        "real": upstream_model("real", upstream_server["base_url"], upstream_server["model"]),
        "gone": upstream_model("gone", f"http://127.0.0.1:{down_port}/v1", "x"),
    }
    cls = ingress.OpenAIIngress.func_or_class.__mro__[1]  # the class under @serve.ingress
    instance = cls.__new__(cls)
    servers = {name: UpstreamModelServer.func_or_class(m) for name, m in models.items()}
    cls.__init__(instance, {name: InReplicaModel(s) for name, s in servers.items()}, None)

    class Context:
        servable_object = instance

    mp = pytest.MonkeyPatch()
    mp.setattr(serve, "get_replica_context", lambda: Context)
    with TestClient(ingress.api) as test_client:  # one event loop for the proxies' clients
        yield test_client, down_port
    mp.undo()


def test_an_upstream_model_answers_through_the_ingress(client):
    http, _ = client
    resp = http.post("/v1/chat/completions", json={"model": "real", "messages": HELLO,
                                                   "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "real" and resp.headers["x-request-id"]
    with http.stream("POST", "/v1/chat/completions", json={
            "model": "real", "messages": HELLO, "max_tokens": 3, "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert stream.status_code == 200 and lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["model"] == "real" for line in lines[:-1])


def test_a_down_upstream_is_a_502_naming_it_through_the_ingress(client):
    http, port = client
    start = time.monotonic()
    for body in ({"model": "gone", "messages": HELLO},
                 {"model": "gone", "messages": HELLO, "stream": True}):
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 502, resp.text
        error = resp.json()["error"]
        assert f"127.0.0.1:{port}" in error["message"]
        assert (error["type"], error["code"]) == ("upstream_error", "upstream_unreachable")
    assert time.monotonic() - start < 5
    health = http.get("/healthz").json()["models"]
    assert health["gone"]["upstream"]["status"] == "down"
    assert health["gone"]["failures"] == 2


def test_the_cards_name_the_engine_and_the_upstream(client):
    http, port = client
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert set(cards) == {"real", "gone"}
    assert cards["gone"]["root"] == "upstream:gone"
    assert cards["gone"]["engine"] == "openai-upstream"
    # ``upstream`` survives ModelList once serve/protocol.py's ModelCard has the field
    if "upstream" in cards["gone"]:
        assert cards["gone"]["upstream"] == {"url": f"http://127.0.0.1:{port}/v1", "model": "x"}
