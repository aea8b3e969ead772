"""The agent graphs without a cluster.

The ``tools`` graph's control flow (structure, tool schemas, step limit, tool errors) is driven
by LangChain's own test double for chat models, ``GenericFakeChatModel`` (it answers with a
scripted list of messages; here it also records what it was bound with and sent): that is the
part of a model a graph's control flow depends on. The served model itself answers the graph
over real HTTP in tests/integration/test_agents_graphs.py. The model's endpoint errors use
real HTTP servers on loopback (refusing, silent, answering 401). The ``ops`` graph runs on a
real MLflow registry (a SQLite store in a temporary folder) with LangGraph's InMemorySaver.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from pydantic import ValidationError

from agents import platform
from agents.graphs import ModelEndpointError, build_ops_graph, build_tools_graph, chat_model
from agents.graphs.model import resolve_endpoint
from raycluster.errors import PlatformError
from raycluster.spec import SpecError
from serve.protocol import error_body
from tests.support import tiny_model as tm
from train import tools as train_tools
from train.tokenizer import tools_line


class ScriptedModel(GenericFakeChatModel):
    """LangChain's fake chat model, recording the tools bound to it and every prompt."""

    bound: list[dict] = []
    prompts: list[list] = []

    def bind_tools(self, tools, **kwargs):
        self.bound = [convert_to_openai_tool(t) for t in tools]
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.prompts.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def call(name: str = "calculator", i: int = 0, **args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": name, "args": args or {"expression": "12*7"},
                                      "id": f"call_{i}"}])


def ask(graph, text: str, config: dict | None = None) -> dict:
    return graph.invoke({"messages": [HumanMessage(text)]}, config)


# -- the tools graph -------------------------------------------------------------------------


def test_graph_is_model_then_tools_until_an_answer():
    graph = build_tools_graph(ScriptedModel(messages=iter([])), [platform.calculator])
    g = graph.get_graph()
    assert set(g.nodes) == {"__start__", "model", "tools", "__end__"}
    assert {(e.source, e.target, e.conditional) for e in g.edges} == {
        ("__start__", "model", False), ("model", "tools", True), ("model", "__end__", True),
        ("tools", "model", False)}


def test_trained_tools_are_declared_as_the_model_learnt_them():
    model = ScriptedModel(messages=iter([]))
    build_tools_graph(model, platform.PLATFORM_TOOLS)
    by_name = {t["function"]["name"]: t for t in model.bound}
    assert list(by_name) == platform.TOOL_NAMES
    for trained in train_tools.TOOLS:  # exactly the definitions of the training data
        assert by_name[trained["function"]["name"]] == trained
    # A platform tool is declared from its signature: the bound context is not an argument.
    params = by_name["pool_units"]["function"]["parameters"]
    assert list(params["properties"]) == ["pool"] and params["required"] == ["pool"]


def test_question_tool_call_result_answer_in_the_tiny_models_format():
    """The exchange the tiny test model was trained on, as the graph carries it: its prompt
    lists the tools the model saw in training, and the tool message is the real result."""
    model = ScriptedModel(messages=iter([call(**tm.TOOL_CALL["arguments"]), tm.TOOL_ANSWER]))
    graph = build_tools_graph(model, [platform.calculator, platform.convert_units])
    assert tools_line(model.bound) == tools_line(tm.TOOLS)
    out = ask(graph, tm.TOOL_QUESTION[0]["content"])
    human, ai, tool, answer = out["messages"]
    assert ai.tool_calls[0]["args"] == tm.TOOL_CALL["arguments"]
    assert isinstance(tool, ToolMessage) and tool.status == "success"
    assert tool.content == tm.TOOL_RESULT == '{"result": 84}'
    assert tool.tool_call_id == ai.tool_calls[0]["id"]
    assert answer.content == tm.TOOL_ANSWER and out["status"] == "answered"
    assert model.prompts[1] == [human, ai, tool]  # the second call sees the result


def test_graph_runs_async_the_same_way():
    model = ScriptedModel(messages=iter([call(**tm.TOOL_CALL["arguments"]), tm.TOOL_ANSWER]))
    graph = build_tools_graph(model, [platform.calculator])
    out = asyncio.run(graph.ainvoke({"messages": [HumanMessage("What is 12*7?")]}))
    assert [m.type for m in out["messages"]] == ["human", "ai", "tool", "ai"]
    assert out["messages"][2].content == tm.TOOL_RESULT and out["status"] == "answered"


def test_system_prompt_is_sent_but_not_stored():
    model = ScriptedModel(messages=iter(["hi"]))
    out = ask(build_tools_graph(model, [platform.calculator], system_prompt="Be brief."), "Hello")
    assert model.prompts[0][0].type == "system" and model.prompts[0][0].content == "Be brief."
    assert [m.type for m in out["messages"]] == ["human", "ai"]


def test_step_limit_stops_a_runaway_loop_with_a_final_message():
    model = ScriptedModel(messages=(call(i=i) for i in range(100)))
    out = ask(build_tools_graph(model, [platform.calculator], step_limit=3), "loop")
    assert out["status"] == "step_limit"
    assert len(model.prompts) == 3  # three model calls, no more
    tools = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert [t.status for t in tools] == ["success", "success", "error"]
    assert json.loads(tools[-1].content) == {
        "error": "not run: the step limit of 3 model calls was reached"}
    final = out["messages"][-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert "step limit of 3" in final.content
    # Every call has its answer, so the thread stays a valid chat for the next question.
    called = [c["id"] for m in out["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert called == [t.tool_call_id for t in tools]


@pytest.mark.parametrize("recursion_limit", [2, 3, 6, 9])
def test_langgraphs_recursion_limit_ends_the_run_the_same_way(recursion_limit):
    model = ScriptedModel(messages=(call(i=i) for i in range(100)))
    graph = build_tools_graph(model, [platform.calculator], step_limit=50)
    out = ask(graph, "loop", {"recursion_limit": recursion_limit})
    assert out["status"] == "step_limit"
    assert "recursion limit" in out["messages"][-1].content


def test_step_limit_counts_per_question_on_a_thread():
    model = ScriptedModel(messages=iter([call(i=0), "84", call(i=1), "85"]))
    graph = build_tools_graph(model, [platform.calculator], step_limit=2,
                              checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "t"}}
    assert ask(graph, "What is 12*7?", cfg)["status"] == "answered"
    out = ask(graph, "And 17*5?", cfg)
    assert out["status"] == "answered" and out["messages"][-1].content == "85"
    assert len(out["messages"]) == 8


def test_a_raising_tool_is_reported_to_the_model_and_the_graph_goes_on():
    def flaky(x: str) -> dict:
        """A tool whose backend is down."""
        raise ConnectionError("backend unreachable")

    model = ScriptedModel(messages=iter([call("flaky", x="1"), call("nope", i=1, y=2),
                                         "Sorry, the tools failed."]))
    out = ask(build_tools_graph(model, [flaky, platform.calculator]), "go")
    errors = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert [e.status for e in errors] == ["error", "error"]
    assert json.loads(errors[0].content) == {"error": "ConnectionError: backend unreachable"}
    assert "nope is not a valid tool" in errors[1].content
    assert out["status"] == "answered" and out["messages"][-1].content == "Sorry, the tools failed."
    assert model.prompts[1][-1] == errors[0]  # the model saw the error


def test_with_tool_errors_stop_a_raising_tool_ends_the_run_naming_it():
    def flaky(x: str) -> dict:
        """A tool whose backend is down."""
        raise ConnectionError("backend unreachable")

    model = ScriptedModel(messages=iter([call("flaky", x="1"), "never asked"]))
    out = ask(build_tools_graph(model, [flaky], tool_errors="stop"), "go")
    assert out["status"] == "tool_error"
    assert len(model.prompts) == 1  # the model was not called again
    final = out["messages"][-1]
    assert "flaky failed" in final.content and "backend unreachable" in final.content
    # A tool that answers {"error": ...} itself did not raise: the run goes on.
    model = ScriptedModel(messages=iter([call("pool_info", pool="nope", fact="gpu"), "No such pool."]))
    out = ask(build_tools_graph(model, [platform.pool_info], tool_errors="stop"), "go")
    assert out["status"] == "answered"


def test_tools_graph_refuses_bad_arguments():
    model = ScriptedModel(messages=iter([]))
    with pytest.raises(ValueError, match="step_limit"):
        build_tools_graph(model, [platform.calculator], step_limit=0)
    with pytest.raises(ValueError, match="at least one tool"):
        build_tools_graph(model, [])
    with pytest.raises(ValueError, match="unique"):
        build_tools_graph(model, [platform.calculator, train_tools.calculator])
    with pytest.raises(ValueError, match="tool_errors"):
        build_tools_graph(model, [platform.calculator], tool_errors="ignore")


# -- the model's endpoint ----------------------------------------------------------------------


def test_endpoint_from_env_and_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "api_key"
    key_file.write_text("# the platform's key\n\nrp-secret\n")
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "RAYPLANE_API_KEY_FILE", "RAYPLANE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(PlatformError, match="OPENAI_BASE_URL"):
        resolve_endpoint()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/app/v1/")
    with pytest.raises(PlatformError, match="RAYPLANE_API_KEY_FILE"):
        resolve_endpoint()
    monkeypatch.setenv("RAYPLANE_API_KEY_FILE", str(key_file))
    assert resolve_endpoint() == ("http://127.0.0.1:8000/app/v1", "rp-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert resolve_endpoint()[1] == "sk-env"
    llm = chat_model(model="tiny-chat", timeout=7)
    assert (llm.openai_api_base, llm.openai_api_key.get_secret_value(), llm.model_name,
            llm.temperature, llm.request_timeout) == \
        ("http://127.0.0.1:8000/app/v1", "sk-env", "tiny-chat", 0, 7)
    monkeypatch.delenv("OPENAI_API_KEY")
    (tmp_path / "empty").write_text("# no key yet\n")
    with pytest.raises(PlatformError, match="holds no key"):
        resolve_endpoint(api_key_file=tmp_path / "empty")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graph_at(url: str, **kwargs):
    llm = chat_model(base_url=url, api_key="rp-test", model="tiny-chat", **kwargs)
    return build_tools_graph(llm, [platform.calculator])


def test_endpoint_that_is_down_fails_fast_naming_it():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(ModelEndpointError) as err:
        ask(_graph_at(url, timeout=5), "What is 12*7?")
    assert time.monotonic() - started < 10
    assert str(err.value).startswith(f"model endpoint {url} is unreachable")
    assert "refused" in str(err.value) and err.value.base_url == url
    with pytest.raises(ModelEndpointError, match=f"model endpoint {url} is unreachable"):
        asyncio.run(_graph_at(url, timeout=5).ainvoke({"messages": [HumanMessage("Hi")]}))


def test_endpoint_that_never_answers_times_out_naming_it():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        started = time.monotonic()
        with pytest.raises(ModelEndpointError, match=f"model endpoint {url} did not answer"):
            ask(_graph_at(url, timeout=1, max_retries=0), "What is 12*7?")
        assert time.monotonic() - started < 10


def test_endpoint_refusing_the_key_names_it_and_says_why():
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's handler name
            body = json.dumps(error_body("Incorrect API key provided.", "authentication_error",
                                         code="invalid_api_key")).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        with pytest.raises(ModelEndpointError) as err:
            ask(_graph_at(url), "What is 12*7?")
        assert str(err.value) == \
            f"model endpoint {url} answered HTTP 401: Incorrect API key provided."
    finally:
        server.shutdown()
        server.server_close()


# -- the ops graph -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow registry (SQLite store) and a way to add versions with a logged metric."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("agents-tests", artifact_location=str(root / "artifacts"))

    def version(model: str, metric: float | None, alias: str | None = None) -> str:
        run = client.create_run(exp)
        if metric is not None:
            client.log_metric(run.info.run_id, "eval_exact_match", metric)
        client.set_terminated(run.info.run_id)
        if not client.search_registered_models(f"name = '{model}'"):
            client.create_registered_model(model)
        mv = client.create_model_version(model, f"runs:/{run.info.run_id}/model",
                                         run_id=run.info.run_id)
        if alias:
            client.set_registered_model_alias(model, alias, mv.version)
        return str(mv.version)

    def champion(model: str) -> str:
        return str(client.get_model_version_by_alias(model, "champion").version)

    return {"uri": uri, "client": client, "version": version, "champion": champion}


def ops(registry, model: str):
    return build_ops_graph(tracking_uri=registry["uri"], model_name=model,
                           checkpointer=InMemorySaver())


def thread(name: str) -> dict:
    return {"configurable": {"thread_id": name}}


def test_better_candidate_is_proposed_and_promoted_on_approval(registry):
    v1 = registry["version"]("approve", 0.5, "champion")
    v2 = registry["version"]("approve", 0.9, "candidate")
    graph = ops(registry, "approve")
    out = graph.invoke({"messages": []}, thread("a"))
    assert out["status"] == "proposed"
    (pending,) = out["__interrupt__"]
    assert pending.value["candidate"]["version"] == v2
    assert pending.value["champion"]["version"] == v1
    assert pending.value["candidate"]["eval_exact_match"] == 0.9
    assert pending.value["champion"]["eval_exact_match"] == 0.5
    proposal = out["messages"][-1]
    assert proposal.content == (
        f"Proposal: promote approve candidate version {v2} (eval_exact_match 0.9) to champion, "
        f"replacing champion version {v1} (eval_exact_match 0.5).")
    assert proposal.tool_calls[0]["name"] == "promote_champion"
    assert registry["champion"]("approve") == v1  # nothing moved before the approval

    done = graph.invoke(Command(resume={"approve": True}), thread("a"))
    assert done["status"] == "promoted"
    assert registry["champion"]("approve") == v2
    assert done["messages"][-1].content == \
        f"Promoted approve version {v2} to champion (was version {v1})."
    assert json.loads(done["messages"][-2].content)["champion"] == v2


def test_rejection_leaves_the_champion_and_says_so(registry):
    v1 = registry["version"]("reject", 0.5, "champion")
    v2 = registry["version"]("reject", 0.7, "candidate")
    graph = ops(registry, "reject")
    assert graph.invoke({"messages": []}, thread("r"))["status"] == "proposed"
    done = graph.invoke(Command(resume={"approve": False, "reason": "wait for the canary"}),
                        thread("r"))
    assert done["status"] == "rejected"
    assert registry["champion"]("reject") == v1
    assert done["messages"][-1].content == (
        f"Not promoted: the reviewer rejected promoting reject version {v2}: wait for the "
        f"canary; champion stays version {v1}.")


def test_an_answer_of_another_shape_is_refused_and_the_proposal_stays(registry):
    v1 = registry["version"]("shape", 0.5, "champion")
    v2 = registry["version"]("shape", 0.6, "candidate")
    graph = ops(registry, "shape")
    graph.invoke({"messages": []}, thread("s"))
    for answer in ("yes", {"approve": "yes"}, {"approved": True}):
        with pytest.raises(ValidationError):
            graph.invoke(Command(resume=answer), thread("s"))
        assert registry["champion"]("shape") == v1
    assert graph.get_state(thread("s")).next == ("review",)
    assert graph.invoke(Command(resume={"approve": True}), thread("s"))["status"] == "promoted"
    assert registry["champion"]("shape") == v2


def test_no_proposal_when_the_champion_is_best_or_no_candidate(registry):
    registry["version"]("best", 0.9, "champion")
    registry["version"]("best", 0.8, "candidate")
    out = ops(registry, "best").invoke({"messages": []}, thread("b"))
    assert out["status"] == "champion_best" and "__interrupt__" not in out
    assert out["messages"][-1].content.startswith("No proposal: best champion version 1")

    v = registry["version"]("same", 0.9, "champion")
    registry["client"].set_registered_model_alias("same", "candidate", v)
    out = ops(registry, "same").invoke({"messages": []}, thread("c"))
    assert out["status"] == "champion_best" and "already the champion" in out["messages"][-1].content

    registry["version"]("lonely", 0.9, "champion")
    out = ops(registry, "lonely").invoke({"messages": []}, thread("d"))
    assert out["status"] == "no_candidate" and "__interrupt__" not in out

    registry["version"]("unmeasured", None, "candidate")
    out = ops(registry, "unmeasured").invoke({"messages": []}, thread("e"))
    assert out["status"] == "no_metric"


def test_first_champion_is_proposed(registry):
    v = registry["version"]("first", 0.4, "candidate")
    graph = ops(registry, "first")
    out = graph.invoke({"messages": []}, thread("f"))
    assert "first has no champion yet" in out["messages"][-1].content
    done = graph.invoke(Command(resume={"approve": True}), thread("f"))
    assert done["status"] == "promoted" and registry["champion"]("first") == v


def test_a_proposal_the_registry_moved_on_from_is_not_applied(registry):
    v1 = registry["version"]("stale", 0.5, "champion")
    registry["version"]("stale", 0.9, "candidate")
    graph = ops(registry, "stale")
    graph.invoke({"messages": []}, thread("g"))
    v3 = registry["version"]("stale", 0.95, "candidate")  # a newer training run
    done = graph.invoke(Command(resume={"approve": True}), thread("g"))
    assert done["status"] == "stale" and registry["champion"]("stale") == v1
    assert f"candidate is now {v3}" in done["messages"][-1].content


def test_ops_graph_needs_a_checkpointer_and_a_registered_model(registry):
    with pytest.raises(ValueError, match="checkpointer"):
        build_ops_graph(tracking_uri=registry["uri"], model_name="x", checkpointer=None)
    with pytest.raises(SpecError, match="'nope' is not a registered model"):
        ops(registry, "nope").invoke({"messages": []}, thread("h"))


def test_ops_graph_with_mlflow_down_fails_fast_naming_it():
    uri = f"http://127.0.0.1:{_free_port()}"
    graph = build_ops_graph(tracking_uri=uri, model_name="m", checkpointer=InMemorySaver())
    started = time.monotonic()
    with pytest.raises(SpecError, match=f"no MLflow server answers at {uri}"):
        graph.invoke({"messages": []}, thread("i"))
    assert time.monotonic() - started < 10
