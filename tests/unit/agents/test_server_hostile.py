"""Regressions of the hostile input schemathesis found against the agents API (each was a 500
from PostgreSQL or LangGraph): refused before the database, as a 422 naming the field, in the
one error shape. PostgreSQL is unreachable here (a loopback port nobody listens on), so a
request that got past validation would answer 503, not 422. And the API's OpenAPI document:
public, every keyed route with its key and its errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from agents.server.app import create_app
from agents.server.errors import from_exception
from agents.server.service import Service
from agents.spec import AgentsAppConfig
from raycluster.local import free_port
from serve.auth import ApiKeyStore

KEY = "rp-test-key"


@pytest.fixture
def client(monkeypatch) -> TestClient:
    monkeypatch.setenv("AGENTS_TEST_KEYS", KEY)
    dsn = f"postgresql://u:secret@127.0.0.1:{free_port()}/a"  # pragma: allowlist secret
    monkeypatch.setenv("AGENTS_TEST_DSN", dsn)
    config = AgentsAppConfig.model_validate({
        "api_keys": {"env": "AGENTS_TEST_KEYS"}, "tracing": False, "mcp": {"enabled": False},
        "checkpointer": {"dsn_env": "AGENTS_TEST_DSN", "timeout_s": 1},
        "model": {"base_url": "http://127.0.0.1:9/v1",
                  "api_key_env": "AGENTS_TEST_KEYS"}})  # pragma: allowlist secret
    app = create_app(Service(config), ApiKeyStore(env="AGENTS_TEST_KEYS"))
    return TestClient(app, headers={"x-api-key": KEY})


def refused(reply, param: str) -> dict:
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error
    return error


@pytest.mark.parametrize(("path", "body", "param"), [
    # PostgreSQL text and jsonb cannot hold NUL (UntranslatableCharacter, 500 before)
    ("/threads", {"metadata": {"k": "a\x00b"}}, "metadata.k"),
    ("/threads", {"thread_id": "t\x00"}, "thread_id"),
    ("/threads/search", {"ids": ["x", "\x00"]}, "ids[1]"),
    ("/runs/wait", {"assistant_id": "tools", "input": {"messages": [{"content": "\x00"}]}},
     "input.messages[0].content"),
    # ... nor text that is not UTF-8 (a lone surrogate JSON can carry)
    ("/threads", {"metadata": {"k": "\ud800"}}, "metadata.k"),
    # OFFSET past bigint (NumericValueOutOfRange, 500 before)
    ("/threads/search", {"offset": 2**63}, "offset"),
    # checkpointer keys of the wrong type (UndefinedFunction / ProgrammingError, 500 before)
    ("/runs/wait", {"assistant_id": "tools", "config": {"configurable": {"checkpoint_ns": True}}},
     "config.configurable.checkpoint_ns"),
    ("/runs/wait", {"assistant_id": "tools",
                    "config": {"configurable": {"checkpoint_id": {"a": 1}}}},
     "config.configurable.checkpoint_id"),
    ("/runs/wait", {"assistant_id": "tools", "config": {"recursion_limit": "many"}},
     "config.recursion_limit"),
    ("/threads/t/history", {"checkpoint": {"checkpoint_id": 7}}, "checkpoint.checkpoint_id"),
    # an empty command (LangGraph's UnboundLocalError 'resume_is_map', 500 before)
    ("/runs/wait", {"assistant_id": "ops", "command": {"goto": "", "resume": None}}, "command"),
    ("/runs/wait", {"assistant_id": "ops", "command": {"update": {}}}, "command"),
    ("/threads/t/history", {"before": {"checkpoint_id": ["x"]}}, "before.checkpoint_id"),
])
def test_a_body_postgres_cannot_take_is_a_422_naming_the_field(client, path, body, param):
    import json

    reply = client.post(path, content=json.dumps(body), headers={"content-type":
                                                                  "application/json"})
    error = refused(reply, param)
    assert error["code"] == "invalid_body"


@pytest.mark.parametrize(("method", "url", "param"), [
    ("get", "/threads/a%00b", "thread_id"),
    ("get", "/threads/t/runs?limit=0", "limit"),
    ("get", "/threads/t/runs?offset=-1", "offset"),
    ("get", "/threads/t/runs?offset=9223372036854775808", "offset"),
    ("get", "/threads/t/runs?status=sleeping", "status"),
    ("post", "/threads/t/runs/r/cancel?action=explode", "action"),
])
def test_a_path_or_query_postgres_cannot_take_is_a_422(client, method, url, param):
    refused(getattr(client, method)(url), param)


def test_graph_refusals_are_the_clients_422_not_a_500():
    from langgraph.errors import EmptyInputError, InvalidUpdateError

    empty = from_exception(EmptyInputError("Received no input for __start__"))
    assert (empty.status, empty.code, empty.param) == (422, "invalid_input", "input")
    update = from_exception(InvalidUpdateError("Node nope does not exist"))
    assert (update.status, update.code) == (422, "invalid_update")
    assert "nope" in update.message
    assert from_exception(RuntimeError("boom")).status == 500


def _model_error(status: int):
    """The ModelEndpointError a graph raises when the model answers ``status``."""
    import httpx
    import openai

    from agents.graphs.model import ModelEndpointError, describe_error

    kind = {400: openai.BadRequestError, 401: openai.AuthenticationError,
            500: openai.InternalServerError}[status]
    reply = httpx.Response(status, request=httpx.Request("POST", "http://m/v1/chat/completions"),
                           json={"error": {"message": "messages: List should have at least 1 "
                                                     "item after validation, not 0"}})
    cause = kind("refused", response=reply, body=reply.json())
    try:
        raise ModelEndpointError(describe_error(cause, "http://m/v1")) from cause
    except ModelEndpointError as err:
        return err


def test_a_conversation_the_model_refuses_is_the_clients_422_an_unreachable_model_502():
    # A run with no message at all (a command on a fresh thread): the model's 400 was a 502.
    refused = from_exception(_model_error(400))
    assert (refused.status, refused.code, refused.param) == (422, "invalid_input", "input")
    assert "at least 1 item" in refused.message
    # The model's own failures stay the upstream's: a wrong key (401), a crash (500).
    assert from_exception(_model_error(401)).status == 502
    assert from_exception(_model_error(500)).status == 502


def test_the_openapi_document_is_public_and_documents_keys_and_errors(client):
    reply = client.get("/openapi.json", headers={"x-api-key": ""})
    assert reply.status_code == 200
    doc = reply.json()
    assert set(doc["components"]["securitySchemes"]) == {"apiKey", "bearer"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path in ("/ok", "/info"):
                assert op["security"] == [] and "422" not in op["responses"]
                continue
            assert op["security"] == [{"apiKey": []}, {"bearer": []}], (method, path)
            for status in ("401", "404", "422", "500", "503"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == error, (method, path, status)
            assert "200" in op["responses"] or "204" in op["responses"], (method, path)
    stream = doc["paths"]["/runs/stream"]["post"]["responses"]["200"]["content"]
    assert stream["text/event-stream"]["schema"]["required"] == ["event", "data"]


def test_a_run_location_header_holds_any_thread_id():
    # A client may name its thread in any Unicode (if_not_exists: create); HTTP headers are
    # Latin-1, so Content-Location spelled it raw and the run answered 500 (schemathesis).
    from urllib.parse import unquote

    from agents.server.app import run_location

    thread = "<ûÄ\x11ó¨\x07\U000a4d70󗦈C㍛/é"
    location = run_location(thread, "run-1")
    location.encode("latin-1")  # what Starlette does with a header value
    assert location.startswith("/threads/") and location.endswith("/runs/run-1")
    assert unquote(location.split("/")[2]) == thread
