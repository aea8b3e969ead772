"""The agents API's pure parts: request bodies as the langgraph-sdk client sends them, the
server-sent events it decodes, the JSON of messages and interrupts, and the mapping of every
failure to one status and the one error body shape."""

from __future__ import annotations

import json
from types import SimpleNamespace

import psycopg
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.types import Interrupt
from langgraph_sdk.sse import SSEDecoder
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, ValidationError

from agents.graphs.model import ModelEndpointError
from agents.server.encoding import jsonable, sse_event, thread_state, wire_mode
from agents.server.errors import ApiError, busy, from_exception, not_found, validation_error
from agents.server.models import RunCreate
from agents.server.runs import graph_config, graph_input, result_of, thread_status
from serve.protocol import error_body


def test_run_body_defaults_and_modes_as_the_sdk_sends_them():
    body = RunCreate.model_validate({"assistant_id": "tools", "input": {"messages": []},
                                     "stream_mode": ["values", "messages-tuple", "values"],
                                     "on_disconnect": "cancel", "langsmith_tracer": None})
    assert body.multitask_strategy == "reject" and body.if_not_exists == "reject"
    assert body.modes() == ["values", "messages-tuple"]
    assert [wire_mode(m) for m in body.modes()] == ["values", "messages"]
    assert RunCreate(assistant_id="ops").modes() == ["values"]
    with pytest.raises(ValidationError):
        RunCreate.model_validate({"assistant_id": "tools", "stream_mode": "debugging"})
    with pytest.raises(ValidationError):
        RunCreate.model_validate({"assistant_id": "tools", "multitask_strategy": "later"})


def test_a_command_resumes_and_input_is_passed_as_is():
    from langgraph.types import Command

    resume = graph_input(RunCreate.model_validate(
        {"assistant_id": "ops", "command": {"resume": {"approve": True}}}))
    assert isinstance(resume, Command) and resume.resume == {"approve": True}
    assert graph_input(RunCreate(assistant_id="tools", input={"messages": []})) == \
        {"messages": []}


def test_run_config_carries_the_thread_the_run_and_the_clients_limits():
    body = RunCreate.model_validate({"assistant_id": "x", "metadata": {"who": "me"},
                                     "config": {"recursion_limit": 7, "tags": ["t"],
                                                "configurable": {"k": 1}, "other": 2}})
    config = graph_config("th-1", body, {"run_id": "r-1", "assistant_id": "a-1"}, "tools")
    assert config["configurable"] == {"k": 1, "thread_id": "th-1"}
    assert config["recursion_limit"] == 7 and config["tags"] == ["t"] and "other" not in config
    assert config["metadata"] == {"who": "me", "run_id": "r-1", "assistant_id": "a-1",
                                  "graph_id": "tools", "thread_id": "th-1"}


def test_sse_events_decode_with_the_sdks_own_decoder():
    decoder = SSEDecoder()
    parts = []
    for event, data in (("metadata", {"run_id": "r"}), ("values", {"messages": []}),
                        ("end", {"run_id": "r", "status": "success"})):
        for line in sse_event(event, data).split(b"\n"):
            part = decoder.decode(line)
            if part is not None:
                parts.append((part.event, part.data))
    assert parts == [("metadata", {"run_id": "r"}), ("values", {"messages": []}),
                     ("end", {"run_id": "r", "status": "success"})]


class Approval(BaseModel):
    approve: bool


def test_messages_and_interrupts_as_langgraphs_server_sends_them():
    out = jsonable({"messages": (HumanMessage("hi", id="1"), AIMessage("yo", id="2")),
                    "__interrupt__": (Interrupt(value={"q": 1}, id="i1"),)})
    human, ai = out["messages"]
    assert (human["type"], human["content"], ai["type"], ai["tool_calls"]) == \
        ("human", "hi", "ai", [])
    assert out["__interrupt__"] == [{"value": {"q": 1}, "id": "i1"}]
    schema = jsonable(Interrupt(value=1, id="i", response_schema=Approval))
    assert schema["response_schema"]["properties"]["approve"]["type"] == "boolean"


def _snapshot(values, interrupts=(), next_=()):
    task = SimpleNamespace(id="t", name="review", error=None, interrupts=interrupts,
                           result=None)
    return SimpleNamespace(values=values, next=next_, tasks=[task] if interrupts else [],
                           interrupts=interrupts, metadata={"step": 2}, created_at="now",
                           config={"configurable": {"thread_id": "th", "checkpoint_ns": "",
                                                    "checkpoint_id": "c2"}},
                           parent_config=None)


def test_final_values_thread_state_and_status():
    pending = (Interrupt(value={"action": "promote"}, id="i1"),)
    snap = _snapshot({"status": "proposed"}, pending, ("review",))
    assert result_of(snap) == {"status": "proposed", "__interrupt__": [
        {"value": {"action": "promote"}, "id": "i1"}]}
    assert thread_status(snap, "success") == thread_status(snap, "error") == "interrupted"
    assert thread_status(_snapshot({"status": "answered"}), "success") == "idle"
    assert thread_status(_snapshot({}), "error") == "error"
    state = thread_state(snap)
    assert state["next"] == ["review"] and state["checkpoint"]["checkpoint_id"] == "c2"
    assert state["tasks"][0]["interrupts"] == [{"value": {"action": "promote"}, "id": "i1"}]
    assert state["parent_checkpoint"] is None


@pytest.mark.parametrize(("err", "status", "code"), [
    (ModelEndpointError("model endpoint http://x/v1 is unreachable (refused)",
                        base_url="http://x/v1"), 502, "model_endpoint_error"),
    (PoolTimeout("couldn't get a connection after 3.00 sec"), 503, "database_unavailable"),
    (psycopg.OperationalError("server closed the connection"), 503, "database_unavailable"),
    (RuntimeError("boom"), 500, "internal_error"),
    (busy("t1"), 409, "thread_busy"),
    (not_found("thread", "t1"), 404, "thread_not_found"),
])
def test_every_failure_has_one_status_and_the_one_body_shape(err, status, code):
    api = from_exception(err)
    assert (api.status, api.code) == (status, code)
    body = api.body()
    assert body == error_body(api.message, api.type, param=api.param, code=code)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if isinstance(err, ModelEndpointError):
        assert "http://x/v1" in body["error"]["message"]  # names the upstream


def test_a_refused_resume_is_422_and_validation_names_the_field():
    try:
        Approval.model_validate({"approve": "maybe?"})
    except ValidationError as err:
        assert from_exception(err).status == 422
    api = validation_error([{"loc": ("body", "limit"), "msg": "Input should be a valid "
                             "integer", "type": "int_parsing"}, {"loc": ("body", "x")}])
    assert (api.status, api.param) == (422, "limit")
    assert api.message == "limit: Input should be a valid integer (and 1 more)"
    assert isinstance(api, ApiError) and json.dumps(api.body())
