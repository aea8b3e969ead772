"""MLflow traces of graph runs, on a real MLflow (a SQLite store in a temporary folder).

The ``tools`` graph runs with LangChain's own fake chat model (``GenericFakeChatModel``); the
traces are read back with ``mlflow.search_traces``, the way the MLflow UI lists them. Tracing
is process-global in MLflow (tracking URI, active experiment, LangChain autologging): the
``traced`` fixture turns it off and restores MLflow's globals after each test.
"""

from __future__ import annotations

import logging
import time

import mlflow
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.checkpoint.memory import InMemorySaver
from mlflow import MlflowClient

from agents import platform
from agents.graphs import build_tools_graph
from agents.tracing import (
    DEFAULT_EXPERIMENT,
    disable_tracing,
    enable_tracing,
    run_config,
    tracing_enabled,
)
from raycluster.local import free_port

SESSION = "mlflow.trace.session"


class FakeModel(GenericFakeChatModel):
    def bind_tools(self, tools, **kwargs):
        return self


def calc_model() -> FakeModel:
    """Asks for the calculator, then answers."""
    return FakeModel(messages=iter([
        AIMessage("", tool_calls=[{"name": "calculator", "args": {"expression": "12*7"},
                                   "id": "call_0"}]),
        AIMessage("12 * 7 = 84.")]))


def ask(graph, thread: str) -> dict:
    return graph.invoke({"messages": [("user", "What is 12*7?")]}, run_config(thread))


@pytest.fixture
def traced(tmp_path, monkeypatch):
    """A SQLite tracking URI whose experiment keeps its artifacts in tmp_path; MLflow's
    globals (tracking URI, active experiment, autologging) as they were afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(DEFAULT_EXPERIMENT,
                                        artifact_location=(tmp_path / "artifacts").as_uri())
    yield uri
    disable_tracing()
    mlflow.flush_trace_async_logging()
    mlflow.set_tracking_uri(None)


def traces(uri: str, thread: str | None = None) -> list:
    mlflow.flush_trace_async_logging()
    exp = MlflowClient(uri).get_experiment_by_name(DEFAULT_EXPERIMENT)
    where = f"metadata.`{SESSION}` = '{thread}'" if thread else None
    return mlflow.search_traces(locations=[exp.experiment_id], filter_string=where,
                                return_type="list")


def test_a_run_is_one_trace_of_its_nodes_model_and_tool_calls_in_its_thread(traced):
    assert enable_tracing(traced) and tracing_enabled()
    graph = build_tools_graph(calc_model(), [platform.calculator], checkpointer=InMemorySaver())
    out = ask(graph, "calc-1")
    assert out["messages"][-1].content == "12 * 7 = 84." and out["status"] == "answered"

    (trace,) = traces(traced)
    assert trace.info.trace_metadata[SESSION] == "calc-1"
    assert trace.info.state == "OK"
    spans = trace.data.spans
    (root,) = [s for s in spans if s.parent_id is None]
    assert root.name == "tools" and root.span_type == "CHAIN"  # the graph, by its name
    names = [s.name for s in spans]
    assert names.count("model") >= 2 and "tools" in names[1:]  # the graph's nodes
    chats = [s for s in spans if s.span_type == "CHAT_MODEL"]
    assert len(chats) == 2
    assert chats[0].outputs["choices"][0]["message"]["tool_calls"][0]["function"] == \
        {"name": "calculator", "arguments": '{"expression": "12*7"}'}
    (tool,) = [s for s in spans if s.span_type == "TOOL"]
    assert tool.name == "calculator"
    assert tool.inputs == {"expression": "12*7"}
    assert tool.outputs["content"] == '{"result": 84}'


def test_threads_are_sessions_and_enabling_twice_traces_once(traced):
    assert enable_tracing(traced)
    assert enable_tracing(traced)  # idempotent: one tracer, one trace per run
    graph = build_tools_graph(calc_model(), [platform.calculator])
    ask(graph, "a")
    graph = build_tools_graph(calc_model(), [platform.calculator])
    ask(graph, "b")
    assert len(traces(traced)) == 2
    assert [t.info.trace_metadata[SESSION] for t in traces(traced, "b")] == ["b"]


def test_disabled_tracing_records_nothing(traced):
    assert enable_tracing(traced)
    disable_tracing()
    assert not tracing_enabled()
    ask(build_tools_graph(calc_model(), [platform.calculator]), "off")
    assert traces(traced) == []


def test_mlflow_down_leaves_tracing_off_and_the_run_working(traced, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agents.tracing"):
        assert enable_tracing(url) is False
        assert enable_tracing(url) is False
    assert time.monotonic() - started < 15
    warnings = [r.getMessage() for r in caplog.records if r.name == "agents.tracing"]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"agent traces are off: MLflow at {url} is not usable")
    assert not tracing_enabled()
    out = ask(build_tools_graph(calc_model(), [platform.calculator]), "down")
    assert out["messages"][-1].content == "12 * 7 = 84."


def test_without_a_tracking_uri_tracing_is_off(traced):
    assert enable_tracing() is False and not tracing_enabled()


def test_run_config_carries_the_thread_for_the_checkpointer_and_the_trace():
    assert run_config("t1") == {"configurable": {"thread_id": "t1"},
                                "metadata": {"thread_id": "t1"}}
    assert run_config("t2", recursion_limit=5, metadata={"user": "ana"},
                      configurable={"checkpoint_ns": ""}) == {
        "recursion_limit": 5, "metadata": {"user": "ana", "thread_id": "t2"},
        "configurable": {"checkpoint_ns": "", "thread_id": "t2"}}
