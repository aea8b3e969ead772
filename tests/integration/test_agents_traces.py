"""Traces of agent graph runs in the platform's MLflow: the ``tools`` graph drives the served
tiny model (tests/support/tiny_model.py, deployed with ``rayplane serve up``) with tracing on
to the session's MLflow server; the run is read back as a user finds it in the MLflow UI: a
trace in the ``rayplane-agents`` experiment whose session is the run's thread id, with the
chat model's and the calculator's spans.
"""

from __future__ import annotations

import json
import os
import uuid

import mlflow
import pytest
from langgraph.checkpoint.memory import InMemorySaver
from mlflow import MlflowClient

from agents import platform
from agents.graphs import build_tools_graph, chat_model
from agents.tracing import DEFAULT_EXPERIMENT, disable_tracing, enable_tracing, run_config

MODEL = "tiny-chat"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def deployed(agent_model) -> str:
    """The session's tiny model behind the platform's API key (tests/integration/conftest.py)."""
    return agent_model["base_url"]


@pytest.fixture
def tracing(local_cluster):
    """Tracing on to the session's MLflow; MLflow's process-global state as it was after."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    active = mlflow.tracking.fluent._active_experiment_id
    assert enable_tracing(local_cluster.mlflow_uri)
    yield local_cluster.mlflow_uri
    disable_tracing()
    mlflow.flush_trace_async_logging()
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
    mlflow.tracking.fluent._active_experiment_id = active
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_a_tools_graph_run_is_a_trace_in_the_platforms_mlflow(deployed, local_cluster,
                                                              tracing):
    thread = f"calc-{uuid.uuid4().hex[:8]}"
    graph = build_tools_graph(chat_model(base_url=deployed, model=MODEL, timeout=60,
                                         api_key_file=local_cluster.api_key_path),
                              [platform.calculator, platform.convert_units],
                              checkpointer=InMemorySaver())
    out = graph.invoke({"messages": [("user", "What is 12*7?")]}, run_config(thread))
    assert out["status"] == "answered" and out["messages"][-1].content == "12 * 7 = 84."

    mlflow.flush_trace_async_logging()
    client = MlflowClient(tracing)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    (trace,) = client.search_traces(
        locations=[experiment.experiment_id],
        filter_string=f"metadata.`mlflow.trace.session` = '{thread}'")
    assert trace.info.state == "OK"
    assert trace.info.trace_metadata["mlflow.trace.session"] == thread
    spans = trace.data.spans
    (root,) = [s for s in spans if s.parent_id is None]
    assert root.name == "tools"
    assert "model" in [s.name for s in spans]
    chats = [s for s in spans if s.span_type == "CHAT_MODEL"]
    assert [s.name for s in chats] == ["ChatOpenAI", "ChatOpenAI"]
    (asked,) = chats[0].outputs["choices"][0]["message"]["tool_calls"]
    assert asked["function"]["name"] == "calculator"
    assert json.loads(asked["function"]["arguments"]) == {"expression": "12*7"}
    (tool,) = [s for s in spans if s.span_type == "TOOL"]
    assert tool.name == "calculator" and tool.inputs == {"expression": "12*7"}
    assert json.loads(tool.outputs["content"]) == platform.calculator("12*7") == {"result": 84}
    assert chats[1].outputs["choices"][0]["message"]["content"] == "12 * 7 = 84."
