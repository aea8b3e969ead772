"""The ``job_estimate`` platform tool without a cluster: its schema as LangChain and MCP see
it, bad arguments as one-line error results naming the argument, and what it says when the
online store has no load for the pool or the registry has no job-duration model (a real
Feast store over the project's repository with the SQLite online store, a real MLflow
registry in a SQLite file). The estimate itself, from the trained model and the platform's
online store, is tests/integration/test_online_features.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from agents import estimates, platform
from agents.mcp_server import build_server
from agents.platform import PLATFORM_TOOLS, PlatformContext, job_estimate
from tests.support import online_store as ost


@pytest.fixture(scope="module")
def store_yaml(tmp_path_factory):
    return ost.sqlite_store(tmp_path_factory.mktemp("feature-store"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """An MLflow registry with no job-duration model (a SQLite file store)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def context(mlflow_uri=None, feature_store=None) -> PlatformContext:
    # The dashboard is never asked: the estimate needs MLflow and the feature store only.
    return PlatformContext("http://127.0.0.1:1", mlflow_uri=mlflow_uri,
                           feature_store=None if feature_store is None else str(feature_store))


def test_the_tool_is_listed_with_typed_arguments_and_no_context():
    """Not in the tools graph's list (the prompt the served model was trained on), offered
    with the untrained tools (the MCP server's list)."""
    from langchain_core.tools import StructuredTool

    assert "job_estimate" not in platform.TOOL_NAMES
    assert [t.__name__ for t in PLATFORM_TOOLS] == platform.TOOL_NAMES
    everything = platform.platform_tools(context(), untrained=True)
    assert [t.__name__ for t in everything] == [*platform.TOOL_NAMES, *platform.UNTRAINED_TOOLS]
    (tool,) = [StructuredTool.from_function(t) for t in everything
               if t.__name__ == "job_estimate"]
    assert set(tool.args) == {"pool", "requested_units", "model_size_b"}
    assert tool.args["requested_units"]["type"] == "integer"
    assert tool.args["model_size_b"]["default"] == 7.0
    assert "wait" in tool.description and "online features" in tool.description


def test_the_mcp_server_exposes_it():
    from mcp import Client

    async def go():
        async with Client(build_server(context())) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            called = await client.call_tool("job_estimate",
                                            {"pool": "h100-timeslise", "requested_units": 2})
            return listed, called

    listed, called = asyncio.run(go())
    assert list(listed) == [*platform.TOOL_NAMES, "job_estimate"]
    schema = listed["job_estimate"].input_schema
    assert schema["required"] == ["pool", "requested_units"]
    assert "did you mean 'h100-timeslice'?" in called.structured_content["error"]


@pytest.mark.parametrize("args, says", [
    (("h100-timeslise", 2), "pool: unknown pool 'h100-timeslise' (did you mean "
                            "'h100-timeslice'?); pools: "),
    (("h100-timeslice", 0), "requested_units: 0 is not a positive whole number of units"),
    (("h100-timeslice", 100_000), "requested_units: 100000 is more than pool "
                                  "'h100-timeslice' can hold ("),
    (("h100-timeslice", 2, -3.0), "model_size_b: -3.0 is not a model size"),
])
def test_bad_arguments_are_error_results_naming_the_argument(args, says, registry):
    result = job_estimate(*args, context=context(registry))
    assert set(result) == {"error"}
    assert result["error"].startswith(says)
    assert "\n" not in result["error"]


def test_without_mlflow_it_says_what_to_set(store_yaml):
    result = job_estimate("h100-timeslice", 2, context=context(None, store_yaml))
    assert "MLFLOW_TRACKING_URI is not set" in result["error"]


def test_a_pool_the_store_has_no_load_for_says_materialize(store_yaml, registry):
    result = job_estimate("cpu", 1, context=context(registry, store_yaml))
    assert result["error"].startswith("the online store holds no pool_load for pool 'cpu'")
    assert "rayplane features materialize" in result["error"]


def test_an_unregistered_model_says_how_to_train_it(store_yaml, registry):
    result = job_estimate("h100-timeslice", 2, context=context(registry, store_yaml))
    assert result["error"].startswith("'job-duration' is not registered in MLflow at")
    assert "python -m train.duration" in result["error"]


def test_an_unreachable_online_store_is_an_error_result(store_yaml, registry, monkeypatch):
    monkeypatch.setenv(ost.PASSWORD_ENV, "not-a-secret")  # pragma: allowlist secret
    down = ost.postgres_store(store_yaml.parent, ost.closed_port(), "down")
    result = job_estimate("h100-timeslice", 2, context=context(registry, down))
    assert result["error"].startswith("the online store cannot be read (")
    assert "\n" not in result["error"]


def test_pool_load_reads_the_online_values(store_yaml):
    assert estimates.pool_load("h100-timeslice", str(store_yaml)) == \
        ost.POOL_LOAD["h100-timeslice"]


def test_durations_read_as_a_person_says_them():
    assert [estimates.human(s) for s in (12.4, 89, 312.5, 5400, 7200, -3)] == \
        ["12 s", "89 s", "5 min", "1 h 30 min", "2 h", "0 s"]


# -- the estimate from a registered Keras model ---------------------------------------------


def _register(uri: str, folder, alias: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("job-estimate-tests")
    exp_id = exp.experiment_id if exp else client.create_experiment("job-estimate-tests")
    run = client.create_run(exp_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(estimates.MODEL_NAME)
    except Exception:  # noqa: BLE001 - registered by an earlier call
        pass
    version = client.create_model_version(estimates.MODEL_NAME,
                                          f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(estimates.MODEL_NAME, alias, version.version)
    return str(version.version)


def _model_folder(folder, seed: int):
    """A job-duration model folder as train.duration logs it (untrained weights: the tool's
    glue is under test, not the model's accuracy)."""
    from train.duration import feature_spec
    from train.duration_model import FEATURES_FILE, MODEL_FILE
    from train.keras_loop import build_model

    spec = feature_spec()
    model = build_model(spec, [1.0] * len(spec.columns), [4.0] * len(spec.columns), [8],
                        1e-3, seed)
    folder.mkdir(parents=True)
    model.save(folder / MODEL_FILE)
    (folder / FEATURES_FILE).write_text(spec.to_json())
    return folder


def test_the_estimate_is_the_registered_models_own_prediction(store_yaml, tmp_path):
    pytest.importorskip("keras")
    from train.duration_model import DurationModel

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _model_folder(tmp_path / "v1", seed=1)
    assert _register(uri, first, "candidate") == "1"
    row = {"requested_units": 2, "model_size_b": 13.0, **ost.POOL_LOAD["h100-timeslice"],
           "pool": "h100-timeslice"}

    result = job_estimate("h100-timeslice", 2, 13, context=context(uri, store_yaml))
    (expected,) = DurationModel.from_folder(first).predict([row])
    assert result["pool_load"] == ost.POOL_LOAD["h100-timeslice"]
    assert result["model"] == {"name": "job-duration", "alias": "candidate", "version": "1"}
    assert result["expected_wait_s"] == round(expected["queue_wait_s"], 1)
    assert result["expected_duration_s"] == round(expected["duration_s"], 1)
    assert result["expected_wait"] == estimates.human(expected["queue_wait_s"])

    # A champion wins over the candidate, and is seen by the next call.
    second = _model_folder(tmp_path / "v2", seed=2)
    assert _register(uri, second, "champion") == "2"
    promoted = job_estimate("h100-timeslice", 2, 13, context=context(uri, store_yaml))
    (expected,) = DurationModel.from_folder(second).predict([row])
    assert promoted["model"] == {"name": "job-duration", "alias": "champion", "version": "2"}
    assert promoted["expected_duration_s"] == round(expected["duration_s"], 1)


# -- the ops graph routes a job question to the tool -----------------------------------------


def test_the_ops_graph_answers_a_job_question_with_the_tool(store_yaml, tmp_path):
    pytest.importorskip("keras")
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langgraph.checkpoint.memory import InMemorySaver

    from agents.graphs.ops import build_ops_graph

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _register(uri, _model_folder(tmp_path / "v1", seed=1), "candidate")
    graph = build_ops_graph(tracking_uri=uri, model_name="job-duration",
                            checkpointer=InMemorySaver(), feature_store=str(store_yaml))

    def ask(text: str, thread: str) -> dict:
        return graph.invoke({"messages": [HumanMessage(text)]},
                            {"configurable": {"thread_id": thread}})

    out = ask("How long will a 2-unit job on h100-timeslice wait?", "q")
    assert out["status"] == "estimated", out["messages"][-1].content
    call, result, answer = out["messages"][1:]
    assert isinstance(call, AIMessage) and call.tool_calls[0]["name"] == "job_estimate"
    assert call.tool_calls[0]["args"] == {"pool": "h100-timeslice", "requested_units": 2}
    assert isinstance(result, ToolMessage) and result.status == "success"
    direct = job_estimate("h100-timeslice", 2, context=context(uri, store_yaml))
    assert out["estimate"] == direct == json.loads(result.content)
    assert answer.content == estimates.describe(direct)
    assert f"would wait about {direct['expected_wait']}" in answer.content

    vague = ask("How long will my job wait?", "v")
    assert vague["status"] == "needs_input"
    assert "h100-timeslice" in vague["messages"][-1].content
    failed = ask("How long would a 2-unit job on cpu take?", "f")  # no load stored for cpu
    assert failed["status"] == "estimate_failed"
    assert failed["messages"][-1].content.startswith("No estimate: the online store holds no "
                                                     "pool_load for pool 'cpu'")
    # Without a question it is the promotion flow (this candidate's run logged no
    # eval_exact_match, so there is nothing to compare).
    assert graph.invoke({"messages": []}, {"configurable": {"thread_id": "p"}}
                        )["status"] == "no_metric"


def test_job_questions_are_read_from_the_text():
    pools = ["cpu", "a100-mig", "a100-timeslice", "h100-timeslice"]
    assert estimates.parse_question("How long will a 2-unit job on h100-timeslice wait?",
                                    pools) == {"pool": "h100-timeslice", "requested_units": 2}
    assert estimates.parse_question("how long would a job of 4 GPUs on A100-timeslice take "
                                    "for a 13B model?", pools) == \
        {"pool": "a100-timeslice", "requested_units": 4, "model_size_b": 13.0}
    assert estimates.parse_question("How long will my job wait?", pools) == \
        {"pool": None, "requested_units": None}
    for unrelated in ("Promote the candidate", "What is 12*7?", "How long is a100-mig's queue?"):
        assert estimates.parse_question(unrelated, pools) is None
