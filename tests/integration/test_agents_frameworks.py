"""The CrewAI crew and the AutoGen team on the session's platform: each a Serve deployment in
its own environment (agents/frameworks/env.py), served by the agents app as the assistants
``crewai`` and ``autogen`` and driven with the official ``langgraph-sdk`` client. Their model
is the session's tiny model (tests/support/tiny_model.py) behind the platform's API key; the
calculator they call is the platform's real one.

The frameworks' environments are built first, as an image build or a node would build them
ahead (``python -m agents.frameworks KIND -c pass``), and timed; a replica's first start
finds them built. Each framework also meets a model endpoint that is down, run in its own
environment without Ray: the run ends with a status naming the endpoint, within seconds.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import yaml
from langgraph_sdk import get_sync_client

from agents.frameworks import DEPLOYMENT_NAMES, KINDS
from agents.frameworks import env as fenv
from raycluster.local import free_port
from tests.integration.conftest import rayplane
from tests.support import tiny_model as tm

APP, PREFIX = "agents-frameworks-tests", "/agents-frameworks-tests"
QUESTION = tm.TOOL_QUESTION[0]["content"]
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def layers() -> dict[str, dict]:
    """Both frameworks' environments, built (or found built) on this machine, and timed."""
    built = {}
    for kind in KINDS:
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "agents.frameworks", kind, "-c",
                              "import sys; print(sys.executable)"],
                             capture_output=True, text=True, timeout=900, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        built[kind] = {"python": out.stdout.strip(), "install_s": fenv.install_seconds(kind),
                       "wall_s": round(time.monotonic() - started, 1)}
    print(f"framework environments: {built}")
    return built


@pytest.fixture(scope="module")
def api(local_cluster, cluster_env, agent_model, layers, tmp_path_factory):
    """An agents app hosting the two framework graphs, deployed with ``rayplane agents up``."""
    config = {"name": APP, "route_prefix": PREFIX, "graphs": ["crewai", "autogen"],
              "model": {"base_url": agent_model["base_url"], "model": agent_model["model"],
                        "api_key_file": agent_model["key_file"], "timeout_s": 60,
                        "max_retries": 0},
              "step_limit": 3, "mcp": {"enabled": False}, "cpus": 0.25,
              "checkpointer": {"timeout_s": 3},
              "autoscaling": {"min_replicas": 1, "max_replicas": 1},
              "api_keys": {"file": str(local_cluster.api_key_path)}}
    path = tmp_path_factory.mktemp("agents-frameworks") / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    out = rayplane(cluster_env, "agents", "up", "-f", str(path), timeout=900)
    print(f"rayplane agents up with both frameworks: {time.monotonic() - started:.1f}s")
    try:
        assert out.returncode == 0, out.stderr + out.stdout
        yield {"url": f"{local_cluster.serve_url}{PREFIX}",
               "key": local_cluster.api_key_path.read_text().strip()}
    finally:
        rayplane(cluster_env, "agents", "down", "-f", str(path), timeout=120)


@pytest.fixture(scope="module")
def client(api):
    return get_sync_client(url=api["url"], api_key=api["key"], timeout=300)


def _model_reply(agent_model, messages: list[dict]) -> str:
    """What the served model answers to ``messages`` with the platform's tools declared (for
    a failure's message: what a framework's request got)."""
    import openai
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from agents.graphs.model import read_api_key_file
    from agents.platform import platform_tools

    key = read_api_key_file(agent_model["key_file"])
    oai = openai.OpenAI(base_url=agent_model["base_url"], api_key=key, timeout=60)
    reply = oai.chat.completions.create(
        model=agent_model["model"], messages=messages, temperature=0,
        tools=[convert_to_openai_tool(t) for t in platform_tools()])
    return reply.choices[0].message.model_dump_json(exclude_none=True)


def _model_knows_the_crew() -> bool:
    """Whether the tiny model is trained on CrewAI's prompt for the question (a model this
    small answers only the chats it learnt, and CrewAI's native prompt wraps the question in
    the agent's role, goal and the task's expected output)."""
    from agents.frameworks.crew import crew_messages

    request = crew_messages(QUESTION)
    for entry in tm.conversations("1"):
        chat = entry[0] if isinstance(entry, tuple) else entry
        if chat[:len(request)] == request:
            return True
    return False


@pytest.mark.parametrize("kind", ["autogen", "crewai"])
def test_framework_answers_with_the_platform_calculator(kind, client, agent_model):
    if kind == "crewai" and not _model_knows_the_crew():
        pytest.skip("the tiny test model (tests/support/tiny_model.py) is not trained on "
                    "CrewAI's prompt (agents.frameworks.crew.crew_messages)")
    thread = client.threads.create(metadata={"suite": "agents-frameworks"})
    started = time.monotonic()
    out = client.runs.wait(thread["thread_id"], kind,
                           input={"messages": [{"role": "user", "content": QUESTION}]})
    elapsed = time.monotonic() - started
    print(f"{kind}: answered in {elapsed:.1f}s: {out}")
    messages = out["messages"]
    calls = [c for m in messages if m["type"] == "ai" for c in m.get("tool_calls") or []]
    if kind == "crewai" and not calls:
        from agents.frameworks.crew import crew_messages

        request = crew_messages(QUESTION)
        pytest.fail(f"the crew's model made no tool call; it was sent {request} (and the "
                    f"platform's tools) and answered {_model_reply(agent_model, request)}; "
                    f"the run: {messages}")
    human, call, result, answer = messages
    assert (human["type"], human["content"]) == ("human", QUESTION)
    assert [(c["name"], c["args"]) for c in call["tool_calls"]] == \
        [("calculator", {"expression": "12*7"})]
    # The platform's calculator really ran in the framework's replica: its result.
    assert result["type"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert json.loads(result["content"]) == {"result": 84}
    assert answer["type"] == "ai" and "84" in answer["content"]
    assert answer["content"] == tm.TOOL_ANSWER
    assert out["status"] == "answered"
    # The thread keeps the run, as for the platform's own graphs.
    assert client.threads.get_state(thread["thread_id"])["values"] == out


def test_each_framework_runs_in_its_own_environment(api, local_cluster, layers):
    """Serve runs each framework's replica with its own interpreter (the layer built above);
    the platform's environment itself has neither framework."""
    from serve.deploy import ServeTarget, client

    details = client(ServeTarget(local_cluster.dashboard_url, local_cluster.auth_headers())
                     ).get_serve_details()
    deployments = details["applications"][APP]["deployments"]
    for kind in KINDS:
        deployment = deployments[DEPLOYMENT_NAMES[kind]]
        assert deployment["status"] == "HEALTHY"
        runtime_env = deployment["deployment_config"]["ray_actor_options"]["runtime_env"]
        assert runtime_env["py_executable"].endswith(f" {kind}")
        assert layers[kind]["python"].startswith(str(fenv.env_home()))
    assert importlib.util.find_spec("crewai") is None
    assert importlib.util.find_spec("autogen_agentchat") is None


DEAD_RUN = """
import asyncio, json, sys, time
from agents.frameworks.common import Endpoint
kind, url = sys.argv[1], sys.argv[2]
ep = Endpoint(base_url=url, api_key="rp-none", model="tiny-chat", timeout_s=5, max_retries=0)
if kind == "crewai":
    from agents.frameworks.crew import build_crew, run_crew
    import crewai  # imported before the clock starts: the run is timed, not the import
    started = time.monotonic()
    out = run_crew("What is 12*7?", ep, max_iter=3)
else:
    from agents.frameworks.team import run_team
    import autogen_agentchat, autogen_ext.models.openai
    started = time.monotonic()
    out = asyncio.run(run_team("What is 12*7?", ep, max_tool_iterations=3))
out["wall_s"] = time.monotonic() - started
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_endpoint_that_is_down_is_a_status_naming_it(kind, layers):
    url = f"http://127.0.0.1:{free_port()}/v1"
    out = subprocess.run([sys.executable, "-m", "agents.frameworks", kind, "-c", DEAD_RUN,
                          kind, url], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["status"] == "model_error", run
    assert run["error"].startswith(f"model endpoint {url} is unreachable"), run
    assert run["tool_calls"] == [] and run["answer"] is None
    assert run["wall_s"] < 30, run
