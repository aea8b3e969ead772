"""The agents API's HTTP surface without a cluster: the FastAPI app of a replica under
Starlette's test client and the official langgraph-sdk client's own request shapes. What
needs no database is answered (assistants; refusals: 401, 404, 422); what needs one answers
503 in the one error shape while PostgreSQL is unreachable (a loopback port nobody listens
on). Threads and runs against a real PostgreSQL are tests/integration/test_agents_api.py."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from agents.server.app import build_agents_app, create_app, deployment_options
from agents.server.graphs import Registry, assistant_id
from agents.server.service import Service
from agents.spec import AgentsAppConfig
from raycluster.local import free_port
from serve.auth import ApiKeyStore

KEY = "rp-test-key"


@pytest.fixture
def config(monkeypatch) -> AgentsAppConfig:
    monkeypatch.setenv("AGENTS_TEST_KEYS", KEY)
    monkeypatch.setenv("AGENTS_TEST_DSN",
                       f"postgresql://u:secret@127.0.0.1:{free_port()}/agents")
    return AgentsAppConfig.model_validate({
        "api_keys": {"env": "AGENTS_TEST_KEYS"}, "tracing": False,
        "checkpointer": {"dsn_env": "AGENTS_TEST_DSN", "timeout_s": 1},
        "model": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "AGENTS_TEST_KEYS"}})


@pytest.fixture
def client(config) -> TestClient:
    app = create_app(Service(config), ApiKeyStore(env="AGENTS_TEST_KEYS"))
    return TestClient(app, headers={"x-api-key": KEY})


def test_assistants_are_the_graphs_by_uuid_or_graph_id(client):
    found = client.post("/assistants/search", json={"limit": 10, "offset": 0}).json()
    assert [a["graph_id"] for a in found] == ["tools", "ops"]
    tools = found[0]
    assert tools["assistant_id"] == assistant_id("tools") == str(uuid.UUID(tools["assistant_id"]))
    assert client.get(f"/assistants/{tools['assistant_id']}").json() == tools
    assert client.get("/assistants/tools").json() == tools
    assert client.post("/assistants/search", json={"graph_id": "ops"}).json()[0]["name"] == "ops"
    page = client.post("/assistants/search", json={"limit": 1})
    assert len(page.json()) == 1 and page.headers["X-Pagination-Next"] == "1"
    assert client.post("/assistants/count", json={}).json() == 2


def test_an_assistant_id_is_the_same_on_every_replica(config):
    assert Registry(config).find("ops").assistant_id == Registry(config).find("ops").assistant_id


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("get", "/assistants/nope", None, 404, "assistant_not_found"),
    ("post", "/assistants/search", {"limit": "many"}, 422, "invalid_body"),
    ("post", "/runs/wait", {"input": {}}, 422, "invalid_body"),
    ("post", "/runs/wait", {"assistant_id": "tools", "stream_mode": "debugging"}, 422,
     "invalid_body"),
    ("post", "/runs/wait", {"assistant_id": "nope", "input": {}}, 404, "assistant_not_found"),
    ("get", "/no/such/route", None, 404, None),
])
def test_refusals_in_the_one_error_shape(client, method, path, body, status, code):
    reply = getattr(client, method)(path, **({"json": body} if body is not None else {}))
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code


def test_a_malformed_body_names_the_field(client):
    reply = client.post("/assistants/search", json={"limit": "many"})
    assert reply.json()["error"]["param"] == "limit"
    assert reply.json()["error"]["message"].startswith("limit: ")


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "rp-wrong"},
                                     {"Authorization": "Bearer rp-wrong"},
                                     {"Authorization": f"Basic {KEY}"}])
def test_no_or_a_wrong_key_is_401_before_anything_else(config, headers):
    app = create_app(Service(config), ApiKeyStore(env="AGENTS_TEST_KEYS"))
    reply = TestClient(app, headers=headers).post("/assistants/search", json={"limit": "x"})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    assert reply.headers["www-authenticate"] == "Bearer"


def test_the_key_as_a_bearer_token_works_too_and_health_needs_none(config):
    app = create_app(Service(config), ApiKeyStore(env="AGENTS_TEST_KEYS"))
    assert TestClient(app, headers={"Authorization": f"Bearer {KEY}"}).get(
        "/assistants/ops").status_code == 200
    assert TestClient(app).get("/ok").json() == {"ok": True}


def test_postgresql_unreachable_is_503_quickly_without_the_password(client):
    started = time.monotonic()
    for method, path, body in (("post", "/threads", {}), ("get", f"/threads/{uuid.uuid4()}",
                                                           None),
                               ("post", "/runs/wait", {"assistant_id": "tools", "input": {}})):
        reply = getattr(client, method)(path, **({"json": body} if body is not None else {}))
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["code"] == "database_unavailable" and "PostgreSQL" in error["message"]
        assert "secret" not in reply.text
    assert time.monotonic() - started < 20


def test_serve_options_come_from_the_spec(config):
    options = deployment_options(config)
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "resources": {"pool:cpu": 0.5}}
    assert options["max_ongoing_requests"] == 64
    assert options["autoscaling_config"]["max_replicas"] == 1
    mig = config.model_copy(update={"pool": "a100-mig"})
    assert deployment_options(mig)["ray_actor_options"] == \
        {"num_cpus": 0, "resources": {"pool:a100-mig": 1.0}}
    app = build_agents_app(config.model_dump(mode="json"))
    assert type(app).__name__ == "Application"


def test_framework_assistants_run_over_the_apps_checkpointer(config):
    """crewai/autogen graphs come from agents.frameworks, given their deployments' handles,
    and keep their threads where the others do."""
    from langgraph.checkpoint.memory import InMemorySaver

    cfg = config.model_copy(update={"graphs": ["tools", "crewai", "autogen"]})
    registry = Registry(cfg, {"crewai": object(), "autogen": object()})
    saver = InMemorySaver()
    asyncio.run(registry.build(saver))
    assert set(registry.graphs) == {"tools", "crewai", "autogen"}
    assert all(g.checkpointer is saver for g in registry.graphs.values())
    assert registry.find(assistant_id("crewai")).graph_id == "crewai"
