"""The CrewAI / AutoGen framework deployments without a cluster or the frameworks: their
environment's recipe, the replica's interpreter command, their Serve options, the tool
wrapper they share, the error lines they report and the LangGraph graph that wraps a
deployment's handle (here a stand-in answering like the deployment does)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, get_args

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import Field

from agents.frameworks import (
    DEPLOYMENT_NAMES,
    KINDS,
    deployment_options,
    framework_graph,
    requirements,
    run_timeout_s,
    runtime_env,
)
from agents.frameworks import env as fenv
from agents.frameworks.common import ToolLog, endpoint, model_error, result
from agents.frameworks.crew import crew_messages
from agents.frameworks.team import _relayed_model_error, described
from agents.graphs.model import ModelEndpointError
from agents.platform import TOOL_NAMES
from agents.spec import AgentsAppConfig
from raycluster.errors import PlatformError

URL = "http://127.0.0.1:9/v1"


def _config(**kw) -> AgentsAppConfig:
    return AgentsAppConfig(graphs=["crewai", "autogen"], allow_unauthenticated=True, **kw)


def test_importing_the_package_imports_no_framework():
    code = ("import sys, agents.frameworks; "
            "print([m for m in sys.modules if m.split('.')[0] in "
            "('crewai', 'autogen_agentchat', 'autogen_core', 'autogen_ext')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", KINDS)
def test_requirements_are_pinned_files(kind):
    reqs = requirements(kind)
    assert reqs and all("==" in r for r in reqs), reqs
    assert fenv.requirements_file(kind).name == f"{kind}-requirements.txt"
    with pytest.raises(PlatformError, match="unknown framework 'langflow'; frameworks: "
                                            "crewai, autogen"):
        requirements("langflow")


def test_the_layer_keeps_the_base_protobuf():
    import google.protobuf

    assert fenv.overrides("autogen") == [f"protobuf=={google.protobuf.__version__}"]


def test_layer_key_follows_the_requirements(monkeypatch, tmp_path):
    monkeypatch.setenv(fenv.HOME_ENV, str(tmp_path))
    first = fenv.env_dir("crewai")
    assert first.parent == tmp_path and first.name.startswith("crewai-")
    assert fenv.env_dir("autogen") != first
    monkeypatch.setattr(fenv, "requirements", lambda kind: ["crewai==0.1"])
    assert fenv.env_dir("crewai") != first


def test_the_replica_interpreter_execs_the_layer_python(monkeypatch, tmp_path):
    """The runtime_env's py_executable, run as Ray runs it (``bash -c "exec <it> ARGS"``),
    starts the layer's Python with the worker's arguments (a layer marked built: a symlink
    to this interpreter, so nothing is installed here)."""
    monkeypatch.setenv(fenv.HOME_ENV, str(tmp_path))
    layer = fenv.env_dir("autogen")
    (layer / "bin").mkdir(parents=True)
    (layer / "bin" / "python").symlink_to(sys.executable)
    (layer / ".rayplane-ready").write_text("12.5\n")
    renv = runtime_env("autogen")
    assert renv["env_vars"][fenv.HOME_ENV] == str(tmp_path)
    assert renv["env_vars"]["CREWAI_DISABLE_TELEMETRY"] == "true"
    assert Path(renv["env_vars"][fenv.UV_ENV]).is_file()
    script = "import sys; print(sys.argv[1:])"
    out = subprocess.run(["bash", "-c", f"exec {renv['py_executable']} -c '{script}' a 'b c'"],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, **renv["env_vars"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['a', 'b c']"
    assert fenv.install_seconds("autogen") == 12.5


def test_without_uv_the_interpreter_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(fenv.HOME_ENV, str(tmp_path))
    monkeypatch.setenv(fenv.UV_ENV, str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(fenv, "HERE", tmp_path / "agents" / "frameworks")
    monkeypatch.setattr(fenv.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(PlatformError, match="need uv to build their environment: install it "
                                            r"\(pip install uv\) or set RAYPLANE_UV"):
        fenv.find_uv()


def test_deployment_options_place_it_on_the_pool_in_its_runtime_env():
    cpu = deployment_options("crewai", _config(cpus=0.25))
    assert cpu["name"] == DEPLOYMENT_NAMES["crewai"] == "CrewAI"
    actor = cpu["ray_actor_options"]
    assert (actor["num_cpus"], actor["resources"]) == (0.25, {"pool:cpu": 0.25})
    assert actor["runtime_env"]["py_executable"].endswith(" crewai")
    assert "runtime_env" in actor and "pip" not in actor["runtime_env"]
    mig = deployment_options("autogen", _config(pool="a100-mig"))
    assert mig["name"] == "AutoGen"
    assert (mig["ray_actor_options"]["num_cpus"], mig["ray_actor_options"]["resources"]) \
        == (0, {"pool:a100-mig": 1.0})
    assert mig["max_ongoing_requests"] == 64
    assert mig["autoscaling_config"]["max_replicas"] == 1
    with pytest.raises(PlatformError, match="unknown framework 'tools'"):
        deployment_options("tools", _config())


def test_run_timeout_bounds_every_model_call():
    cfg = _config(step_limit=3, model={"timeout_s": 10})
    assert run_timeout_s(cfg) == 40


def test_tool_log_records_calls_and_keeps_the_tool_schema():
    log = ToolLog()
    tools = log.tools()
    assert [t.__name__ for t in tools] == TOOL_NAMES
    calc = next(t for t in tools if t.__name__ == "calculator")
    sig = inspect.signature(calc)
    assert list(sig.parameters) == ["expression"] and sig.return_annotation is str
    assert "context" not in inspect.signature(tools[0]).parameters  # pool_units: bound
    assert calc.__doc__ and "arithmetic" in calc.__doc__.lower()
    assert json.loads(calc("12*7")) == {"result": 84}
    assert json.loads(calc(expression="2**")) == log.calls[-1]["result"]
    assert "error" in log.calls[-1]["result"]
    first = log.calls[0]
    assert (first["name"], first["args"], first["result"]) == \
        ("calculator", {"expression": "12*7"}, {"result": 84})
    assert first["id"].startswith("call_") and first["id"] != log.calls[1]["id"]


def test_a_raising_tool_is_a_result():
    def broken(x: int) -> dict:
        """Always fails."""
        raise RuntimeError("disk on fire\nmore")

    log = ToolLog()
    assert json.loads(log.record(broken)(3)) == {"error": "disk on fire"}
    assert log.calls[0]["args"] == {"x": 3}


def test_autogen_reads_the_parameter_descriptions():
    def tool(pool: Annotated[str, Field(description="pool name")], n: int = 1) -> str:
        return pool

    hints = described(tool).__annotations__
    assert get_args(hints["pool"]) == (str, "pool name") and hints["n"] is int


def test_endpoint_from_the_spec_or_the_platform_defaults(monkeypatch, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# keys\nrp-test\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("RAYPLANE_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("OPENAI_BASE_URL", "http://model:8000/v1/")
    ep = endpoint(_config(model={"model": "tiny", "timeout_s": 7}))
    assert (ep.base_url, ep.api_key, ep.model, ep.timeout_s) == \
        ("http://model:8000/v1", "rp-test", "tiny", 7)
    with pytest.raises(PlatformError, match="model.api_key_env: MY_KEY is not set"):
        endpoint(_config(model={"api_key_env": "MY_KEY"}))
    monkeypatch.setenv("MY_KEY", "rp-env")
    assert endpoint(_config(model={"api_key_env": "MY_KEY"})).api_key == "rp-env"


def test_model_errors_name_the_endpoint():
    request = httpx.Request("POST", f"{URL}/chat/completions")
    down = openai.APIConnectionError(request=request)
    down.__cause__ = ConnectionRefusedError(111, "Connection refused")
    try:
        try:
            raise down
        except openai.APIConnectionError as err:
            raise RuntimeError("the framework's own wrapper") from err
    except RuntimeError as wrapped:
        assert model_error(wrapped, URL) == (f"model endpoint {URL} is unreachable "
                                             "([Errno 111] Connection refused)")
    assert model_error(ValueError("bad tool"), URL) is None
    # AutoGen's team relays an agent's error as text only.
    assert _relayed_model_error(RuntimeError("APIConnectionError: Connection error."), URL) \
        == f"model endpoint {URL} is unreachable (Connection error.)"
    assert _relayed_model_error(RuntimeError("APITimeoutError: Request timed out."), URL) \
        == f"model endpoint {URL} did not answer in time (request timed out)"
    assert _relayed_model_error(RuntimeError("ValueError: no"), URL) is None


def test_crew_messages_hold_the_question():
    system, user = crew_messages("What is 12*7?")
    assert system["role"] == "system" and "Your personal goal is" in system["content"]
    assert user["content"].startswith("\nCurrent Task: What is 12*7?\n")


# -- the graph over a deployment's handle ----------------------------------------------------


class _Response:
    def __init__(self, value, delay: float = 0.0):
        self.value, self.delay = value, delay

    def result(self, timeout_s: float | None = None):
        if self.delay > (timeout_s or 0):
            raise TimeoutError(f"timed out after {timeout_s}s")
        return self.value

    def __await__(self):
        async def wait():
            await asyncio.sleep(self.delay)
            return self.value

        return wait().__await__()


class _Method:
    def __init__(self, answer, delay: float = 0.0):
        self.answer, self.delay, self.questions = answer, delay, []

    def remote(self, question: str) -> _Response:
        self.questions.append(question)
        return _Response(self.answer, self.delay)


class _Handle:
    """Answers ``run.remote(question)`` like the framework deployment (its result dict)."""

    def __init__(self, answer, delay: float = 0.0):
        self.run = _Method(answer, delay)


def _answered() -> dict:
    log = ToolLog()
    next(t for t in log.tools() if t.__name__ == "calculator")("12*7")
    return result(framework="autogen", status="answered", answer="12 * 7 = 84.", log=log)


def test_graph_appends_the_tool_calls_and_the_answer():
    handle = _Handle(_answered())
    graph = framework_graph("autogen", _config(), handle)
    out = graph.invoke({"messages": [("user", "What is 12*7?")]})
    human, call, tool, answer = out["messages"]
    assert isinstance(human, HumanMessage) and handle.run.questions == ["What is 12*7?"]
    assert isinstance(call, AIMessage) and [(c["name"], c["args"]) for c in call.tool_calls] \
        == [("calculator", {"expression": "12*7"})]
    assert isinstance(tool, ToolMessage) and tool.tool_call_id == call.tool_calls[0]["id"]
    assert json.loads(tool.content) == {"result": 84} and tool.status == "success"
    assert answer.content == "12 * 7 = 84." and answer.response_metadata["status"] == "answered"
    assert out["status"] == "answered"
    # Async (the agents API streams): the same.
    again = asyncio.run(graph.ainvoke({"messages": [("user", "What is 12*7?")]}))
    assert [m.type for m in again["messages"]] == ["human", "ai", "tool", "ai"]


def test_graph_says_when_the_run_stopped_at_the_step_limit():
    out = framework_graph("crewai", _config(), _Handle(
        result(framework="crewai", status="step_limit"))).invoke(
        {"messages": [("user", "loop forever")]})
    assert out["status"] == "step_limit"
    assert out["messages"][-1].content == ("The crewai run stopped at its step limit before "
                                           "an answer.")


def test_graph_raises_the_model_endpoint_error_or_the_framework_error():
    down = result(framework="crewai", status="model_error",
                  error=f"model endpoint {URL} is unreachable (refused)")
    graph = framework_graph("crewai", _config(), _Handle(down))
    with pytest.raises(ModelEndpointError, match=f"model endpoint {URL} is unreachable"):
        graph.invoke({"messages": [("user", "What is 12*7?")]})
    broken = result(framework="crewai", status="error", error="ImportError: no crewai")
    with pytest.raises(PlatformError) as err:
        framework_graph("crewai", _config(), _Handle(broken)).invoke(
            {"messages": [("user", "What is 12*7?")]})
    assert str(err.value) == "crewai: ImportError: no crewai"


def test_graph_does_not_wait_past_its_bound(monkeypatch):
    from agents.frameworks import graph as fgraph

    monkeypatch.setattr(fgraph, "HANDLE_SLACK_S", 0.2)
    cfg = _config(step_limit=1, model={"timeout_s": 0.1})
    graph = framework_graph("autogen", cfg, _Handle(_answered(), delay=5))
    with pytest.raises(PlatformError, match="the autogen deployment did not answer in 0s"):
        asyncio.run(graph.ainvoke({"messages": [("user", "What is 12*7?")]}))
    with pytest.raises(PlatformError, match="the autogen deployment did not answer"):
        graph.invoke({"messages": [("user", "What is 12*7?")]})


def test_graph_without_a_question_answers_so():
    handle = _Handle(_answered())
    out = framework_graph("autogen", _config(), handle).invoke(
        {"messages": [AIMessage(content="hi")]})
    assert out["status"] == "error" and "no question" in out["messages"][-1].content
    assert handle.run.questions == []
    with pytest.raises(PlatformError, match="needs its framework deployment's handle"):
        framework_graph("autogen", _config(), None)
