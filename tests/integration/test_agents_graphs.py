"""The agent graphs against the local platform: the ``tools`` graph drives the served tiny
model (tests/support/tiny_model.py, deployed with ``rayplane serve up``) over its OpenAI API
with the platform's API key and runs the real calculator; the ``ops`` graph reads and moves
the aliases of the platform's MLflow registry, stopping for approval.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from mlflow import MlflowClient

from agents import platform
from agents.graphs import ModelEndpointError, build_ops_graph, build_tools_graph, chat_model
from raycluster.local import free_port
from tests.support import tiny_model as tm

MODEL = "tiny-chat"
PREFIX = "/agents-tests"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tm.cached_tiny_model("1")


@pytest.fixture(scope="module")
def deployed(agent_model):
    """The session's tiny model behind the platform's API key (tests/integration/conftest.py)."""
    return agent_model


def test_tools_graph_answers_from_the_real_calculator(deployed, cluster_env, monkeypatch):
    """The endpoint and key as ``rayplane env`` exports them (OPENAI_BASE_URL pointed at the
    app's prefix, the key file RAYPLANE_API_KEY_FILE)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", deployed["base_url"])
    monkeypatch.setenv("RAYPLANE_API_KEY_FILE", cluster_env["RAYPLANE_API_KEY_FILE"])
    graph = build_tools_graph(chat_model(model=MODEL, timeout=60),
                              [platform.calculator, platform.convert_units],
                              checkpointer=InMemorySaver())
    out = graph.invoke({"messages": [("user", "What is 12*7?")]},
                       {"configurable": {"thread_id": "calc"}})
    human, call, result, answer = out["messages"]
    assert isinstance(call, AIMessage)
    assert [(c["name"], c["args"]) for c in call.tool_calls] == \
        [("calculator", {"expression": "12*7"})]
    # The calculator really ran: its result, as the graph sent it back to the model.
    assert isinstance(result, ToolMessage) and result.status == "success"
    assert result.tool_call_id == call.tool_calls[0]["id"]
    assert json.loads(result.content) == platform.calculator("12*7") == {"result": 84}
    assert answer.content == "12 * 7 = 84." and "84" in answer.content
    assert out["status"] == "answered"


def test_a_platform_answer_follows_the_clusters_state(deployed, cluster_env, local_cluster):
    """"How many free GPU units does the a100-mig pool have?" asked through the tools graph
    with the live platform tools: the model calls pool_units, the answer is the one its
    result gives; a job holding one more unit changes the answer, stopping it changes it
    back."""
    from ray.job_submission import JobSubmissionClient

    context = platform.PlatformContext.from_env(cluster_env)
    graph = build_tools_graph(
        chat_model(base_url=deployed["base_url"], model=MODEL, timeout=60,
                   api_key=local_cluster.api_key_path.read_text().strip()),
        platform.platform_tools(context))

    def ask() -> tuple[dict, str]:
        # Ray reports usage every few seconds: ask until the tool's result is a settled one.
        deadline = time.monotonic() + 60
        while True:
            out = graph.invoke({"messages": [tm.POOL_QUESTION[0]["content"]]})
            call, result = out["messages"][1], out["messages"][2]
            assert [(c["name"], c["args"]) for c in call.tool_calls] == \
                [(tm.POOL_CALL["name"], tm.POOL_CALL["arguments"])]
            seen = json.loads(result.content)
            if seen.get("used") is not None or time.monotonic() > deadline:
                return seen, out["messages"][-1].content
            time.sleep(2)

    before, answer = ask()
    assert answer == tm.pool_answer(before)  # the model answered from the live result
    jobs = JobSubmissionClient(local_cluster.dashboard_url, headers=local_cluster.auth_headers())
    hold = ("import ray, time; ray.init(); "
            "pg = ray.util.placement_group([{'pool:a100-mig': 1}]); ray.get(pg.ready()); "
            "time.sleep(600)")
    job = jobs.submit_job(entrypoint=f'python -c "{hold}"',
                          submission_id=f"hold-{uuid.uuid4().hex[:8]}")
    try:
        deadline = time.monotonic() + 90
        while platform.pool_units("a100-mig", context=context).get("used") != before["used"] + 1:
            assert time.monotonic() < deadline, "the job never got its unit"
            time.sleep(1)
        held, held_answer = ask()
        assert held["free"] == before["free"] - 1
        assert held_answer == tm.pool_answer(held) != answer
    finally:
        jobs.stop_job(job)


def test_tools_graph_with_a_wrong_key_names_the_endpoint(deployed):
    graph = build_tools_graph(chat_model(base_url=deployed["base_url"], api_key="rp-wrong",
                                         model=MODEL), [platform.calculator])
    with pytest.raises(ModelEndpointError) as err:
        graph.invoke({"messages": [("user", "What is 12*7?")]})
    assert str(err.value) == (f"model endpoint {deployed['base_url']} answered HTTP 401: "
                              "Incorrect API key provided.")


def test_tools_graph_with_the_endpoint_down_fails_fast_naming_it(local_cluster):
    url = f"http://127.0.0.1:{free_port()}{PREFIX}/v1"
    graph = build_tools_graph(chat_model(base_url=url, api_key_file=local_cluster.api_key_path,
                                         model=MODEL, timeout=10), [platform.calculator])
    started = time.monotonic()
    with pytest.raises(ModelEndpointError, match=f"model endpoint {url} is unreachable"):
        graph.invoke({"messages": [("user", "What is 12*7?")]})
    assert time.monotonic() - started < 15


def test_ops_graph_promotes_on_approval_and_not_on_rejection(local_cluster, model_dir):
    uri = local_cluster.mlflow_uri
    client = MlflowClient(tracking_uri=uri)
    name = f"agents-ops-{uuid.uuid4().hex[:6]}"

    def version(alias: str, exact_match: float) -> str:
        v = tm.register_model(model_dir, name, tracking_uri=uri, alias=alias)
        client.log_metric(client.get_model_version(name, v).run_id, "eval_exact_match",
                          exact_match)
        return v

    def champion() -> str:
        return str(client.get_model_version_by_alias(name, "champion").version)

    v1, v2 = version("champion", 0.5), version("candidate", 0.9)
    graph = build_ops_graph(tracking_uri=uri, model_name=name, checkpointer=InMemorySaver())
    first = {"configurable": {"thread_id": "approve"}}
    out = graph.invoke({"messages": []}, first)
    assert out["status"] == "proposed"
    (pending,) = out["__interrupt__"]
    assert (pending.value["candidate"]["version"], pending.value["champion"]["version"]) \
        == (v2, v1)
    assert out["messages"][-1].content == (
        f"Proposal: promote {name} candidate version {v2} (eval_exact_match 0.9) to champion, "
        f"replacing champion version {v1} (eval_exact_match 0.5).")
    assert champion() == v1  # stopped before the privileged tool

    out = graph.invoke(Command(resume={"approve": True}), first)
    assert out["status"] == "promoted" and champion() == v2

    # A newer, better candidate; the reviewer says no.
    v3 = version("candidate", 0.95)
    second = {"configurable": {"thread_id": "reject"}}
    out = graph.invoke({"messages": []}, second)
    assert out["status"] == "proposed" and f"version {v3}" in out["messages"][-1].content
    assert f"champion version {v2}" in out["messages"][-1].content
    out = graph.invoke(Command(resume={"approve": False, "reason": "not now"}), second)
    assert out["status"] == "rejected" and champion() == v2
    assert out["messages"][-1].content == (
        f"Not promoted: the reviewer rejected promoting {name} version {v3}: not now; "
        f"champion stays version {v2}.")
