"""The agents app on the session's Ray Serve, driven by LangGraph's own ``langgraph-sdk``
client: assistants, threads, runs (wait, stream, background), the ``ops`` graph's interrupt
and resume on the session's MLflow registry, one run at a time per thread, every refusal in
the one error shape, a model endpoint that is down, a replica killed under a thread, and
PostgreSQL going down and coming back.

The apps are deployed with ``rayplane agents up -f`` (module-scoped, removed at the end): the
one under test calls the session's tiny model (tests/support/tiny_model.py); a second one's
model endpoint is a port nobody listens on.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest
import yaml
from langgraph_sdk import get_sync_client
from langgraph_sdk.errors import (
    AuthenticationError,
    ConflictError,
    InternalServerError,
    NotFoundError,
)
from mlflow import MlflowClient

from raycluster.local import free_port
from tests.integration.conftest import rayplane
from tests.support import tiny_model as tm

APP, PREFIX = "agents-api-tests", "/agents-api-tests"
DEAD_APP, DEAD_PREFIX = "agents-api-dead", "/agents-api-dead"
OPS_MODEL = f"agents-api-ops-{uuid.uuid4().hex[:6]}"
QUESTION = {"messages": [{"role": "user", "content": "What is 12*7?"}]}
ANSWER = "12 * 7 = 84."
pytestmark = pytest.mark.timeout(900)


def _config(local_cluster, agent_model, *, name: str, prefix: str, base_url: str,
            timeout_s: float) -> dict:
    return {"name": name, "route_prefix": prefix, "graphs": ["tools", "ops"],
            "model": {"base_url": base_url, "model": agent_model["model"],
                      "api_key_file": agent_model["key_file"], "timeout_s": timeout_s,
                      "max_retries": 0},
            "registered_model": OPS_MODEL, "mlflow_tracking_uri": local_cluster.mlflow_uri,
            "checkpointer": {"timeout_s": 3}, "mcp": {"enabled": False}, "cpus": 0.25,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "api_keys": {"file": str(local_cluster.api_key_path)}}


@pytest.fixture(scope="module")
def api(local_cluster, cluster_env, agent_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agents-api")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    files = []
    for name, prefix, url, timeout in ((APP, PREFIX, agent_model["base_url"], 60),
                                       (DEAD_APP, DEAD_PREFIX, dead, 5)):
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_config(local_cluster, agent_model, name=name,
                                               prefix=prefix, base_url=url, timeout_s=timeout)))
        files.append(path)
    try:
        for path in files:
            out = rayplane(cluster_env, "agents", "up", "-f", str(path))
            assert out.returncode == 0, out.stderr + out.stdout
        yield {"url": f"{local_cluster.serve_url}{PREFIX}", "key":
               local_cluster.api_key_path.read_text().strip(), "dead": dead,
               "dead_url": f"{local_cluster.serve_url}{DEAD_PREFIX}"}
    finally:
        for path in files:
            rayplane(cluster_env, "agents", "down", "-f", str(path), timeout=120)


@pytest.fixture(scope="module")
def client(api):
    return get_sync_client(url=api["url"], api_key=api["key"], timeout=120)


def _texts(values: dict) -> list[tuple[str, str]]:
    return [(m["type"], m["content"]) for m in values["messages"]]


def test_assistants_are_the_hosted_graphs(client):
    found = {a["graph_id"]: a for a in client.assistants.search()}
    assert set(found) == {"tools", "ops"}
    tools = found["tools"]
    assert client.assistants.get("tools") == tools
    assert client.assistants.get(tools["assistant_id"]) == tools
    graph = client.assistants.get_graph(tools["assistant_id"])
    assert {"model", "tools"} <= {n["id"] for n in graph["nodes"]}
    assert "messages" in client.assistants.get_schemas("ops")["input_schema"]["properties"]


def test_a_thread_runs_keeps_state_history_and_metadata(client, local_cluster):
    thread = client.threads.create(metadata={"suite": "agents-api"})
    tid = thread["thread_id"]
    assert client.threads.get(tid)["status"] == "idle"
    out = client.runs.wait(tid, "tools", input=QUESTION)
    assert out["status"] == "answered" and out["messages"][-1]["content"] == ANSWER
    call, result = out["messages"][1:3]
    assert [c["name"] for c in call["tool_calls"]] == ["calculator"]
    assert result["type"] == "tool" and result["content"] == '{"result": 84}'
    state = client.threads.get_state(tid)
    assert state["values"] == out and state["next"] == []
    got = client.threads.get(tid)
    assert got["status"] == "idle" and got["values"] == out
    assert got["metadata"]["suite"] == "agents-api" and got["metadata"]["graph_id"] == "tools"
    history = client.threads.get_history(tid, limit=20)
    assert history[0]["values"] == out and len(history) >= 4
    assert history[0]["checkpoint"]["checkpoint_id"] == state["checkpoint"]["checkpoint_id"]
    assert tid in [t["thread_id"] for t in client.threads.search(metadata={"suite": "agents-api"})]
    (run,) = client.runs.list(tid)
    assert run["status"] == "success"
    assert client.runs.get(tid, run["run_id"])["run_id"] == run["run_id"]
    # The run is an MLflow trace whose session is the thread (exported in the background).
    mlflow = MlflowClient(tracking_uri=local_cluster.mlflow_uri)
    experiment = mlflow.get_experiment_by_name("rayplane-agents")
    deadline, traces = time.monotonic() + 60, []
    while experiment is not None and not traces and time.monotonic() < deadline:
        traces = mlflow.search_traces(locations=[experiment.experiment_id], filter_string=
                                      f"metadata.`mlflow.trace.session` = '{tid}'")
        time.sleep(2)
    assert traces, f"no MLflow trace with session {tid}"
    client.threads.delete(tid)
    with pytest.raises(NotFoundError):
        client.threads.get(tid)


def test_stream_events_come_in_graph_order_and_end_with_the_final_state(client):
    tid = client.threads.create()["thread_id"]
    parts = list(client.runs.stream(tid, "tools", input=QUESTION,
                                    stream_mode=["values", "updates", "messages-tuple"]))
    events = [p.event for p in parts]
    assert events[0] == "metadata" and parts[0].data["thread_id"] == tid
    assert events[-1] == "end" and events[-2] == "values"
    final = client.threads.get_state(tid)["values"]
    assert parts[-2].data == final and final["messages"][-1]["content"] == ANSWER
    updates = [next(iter(p.data)) for p in parts if p.event == "updates"]
    assert updates == ["model", "tools", "model"]
    values = [p.data for p in parts if p.event == "values"]
    assert [len(v["messages"]) for v in values] == [1, 2, 3, 4]
    # The model's tokens arrive before its node's update; the answer's add up to it.
    second = [i for i, p in enumerate(parts) if p.event == "updates"][1]
    tokens = [m for m, meta in (p.data for p in parts[second:] if p.event == "messages")
              if meta["langgraph_node"] == "model"]
    assert tokens and "".join(m["content"] for m in tokens) == ANSWER
    # Stateless: the same events, on a thread that is gone afterwards.
    stateless = list(client.runs.stream(None, "tools", input=QUESTION, stream_mode="updates"))
    assert [p.event for p in stateless] == ["metadata", "updates", "updates", "updates", "end"]
    assert client.runs.wait(None, "tools", input=QUESTION)["messages"][-1]["content"] == ANSWER
    with pytest.raises(NotFoundError):
        client.threads.get(stateless[0].data["thread_id"])


def test_one_run_at_a_time_409_enqueue_join_and_cancel(client):
    tid = client.threads.create()["thread_id"]
    first = client.runs.create(tid, "tools", input=QUESTION)
    with pytest.raises(ConflictError) as busy:
        client.runs.create(tid, "tools", input=QUESTION)
    assert busy.value.body["error"]["code"] == "thread_busy"
    queued = client.runs.create(tid, "tools", multitask_strategy="enqueue", input={
        "messages": [{"role": "user", "content": "What is 3*4?"}]})
    dropped = client.runs.create(tid, "tools", multitask_strategy="enqueue", input={
        "messages": [{"role": "user", "content": "never asked"}]})
    cancelled = client.runs.cancel(tid, dropped["run_id"], wait=True)
    assert cancelled["status"] == "interrupted"
    out = client.runs.join(tid, queued["run_id"])
    statuses = {r["run_id"]: r["status"] for r in client.runs.list(tid)}
    assert statuses == {first["run_id"]: "success", queued["run_id"]: "success",
                        dropped["run_id"]: "interrupted"}
    humans = [c for t, c in _texts(out) if t == "human"]
    assert humans == ["What is 12*7?", "What is 3*4?"]  # one after the other, never mixed
    first_answer = [c for t, c in _texts(out)].index(ANSWER)
    assert first_answer < [c for t, c in _texts(out)].index("What is 3*4?")


def test_ops_stops_for_approval_approve_moves_the_alias_reject_does_not(client, local_cluster):
    uri = local_cluster.mlflow_uri
    registry = MlflowClient(tracking_uri=uri)
    model_dir = tm.cached_tiny_model("1")

    def version(alias: str, exact_match: float) -> str:
        v = tm.register_model(model_dir, OPS_MODEL, tracking_uri=uri, alias=alias)
        registry.log_metric(registry.get_model_version(OPS_MODEL, v).run_id,
                            "eval_exact_match", exact_match)
        return v

    def champion() -> str:
        return str(registry.get_model_version_by_alias(OPS_MODEL, "champion").version)

    v1, v2 = version("champion", 0.5), version("candidate", 0.9)
    tid = client.threads.create()["thread_id"]
    out = client.runs.wait(tid, "ops", input={"messages": []})
    (pending,) = out["__interrupt__"]
    assert out["status"] == "proposed" and pending["value"]["candidate"]["version"] == v2
    assert client.threads.get(tid)["status"] == "interrupted"
    assert client.threads.get_state(tid)["next"] == ["review"] and champion() == v1
    with pytest.raises(httpx.HTTPStatusError) as refused:  # a malformed answer
        client.runs.wait(tid, "ops", command={"resume": {"approve": "yes"}})
    assert refused.value.response.status_code == 422
    assert client.threads.get_state(tid)["next"] == ["review"] and champion() == v1
    out = client.runs.wait(tid, "ops", command={"resume": {"approve": True}})
    assert out["status"] == "promoted" and champion() == v2
    assert client.threads.get(tid)["status"] == "idle"

    v3 = version("candidate", 0.95)
    tid = client.threads.create()["thread_id"]
    out = client.runs.wait(tid, "ops", input={"messages": []})
    assert out["__interrupt__"][0]["value"]["candidate"]["version"] == v3
    out = client.runs.wait(tid, "ops", command={"resume": {"approve": False,
                                                           "reason": "not now"}})
    assert out["status"] == "rejected" and champion() == v2


def test_bad_input_404_422_401_in_one_shape(client, api):
    unknown = str(uuid.uuid4())
    tid = client.threads.create()["thread_id"]
    for call in (lambda: client.threads.get(unknown), lambda: client.assistants.get("nope"),
                 lambda: client.runs.get(tid, unknown),
                 lambda: client.threads.get_state(unknown)):
        with pytest.raises(NotFoundError) as err:
            call()
        assert set(err.value.body["error"]) == {"message", "type", "param", "code"}
    for path, body in ((f"/threads/{unknown}/runs/wait", {"assistant_id": "tools"}),
                       ("/runs/wait", {"assistant_id": "nope", "input": {}})):
        reply = httpx.post(api["url"] + path, json=body, headers={"x-api-key": api["key"]})
        assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"
    reply = httpx.post(f"{api['url']}/threads/search", json={"limit": "many"},
                       headers={"Authorization": f"Bearer {api['key']}"})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "limit"
    for key in ("rp-wrong", None):
        anonymous = get_sync_client(url=api["url"], api_key=key)  # None: no key at all
        with pytest.raises(AuthenticationError) as err:
            anonymous.threads.search()
        assert err.value.body["error"]["type"] == "authentication_error"


def test_a_model_endpoint_that_is_down_fails_the_run_fast_naming_it(api):
    dead = get_sync_client(url=api["dead_url"], api_key=api["key"], timeout=60)
    started = time.monotonic()
    with pytest.raises(httpx.HTTPStatusError) as err:
        dead.runs.wait(None, "tools", input=QUESTION)
    assert err.value.response.status_code == 502
    error = err.value.response.json()["error"]
    assert error["code"] == "model_endpoint_error" and api["dead"] in error["message"]
    tid = dead.threads.create()["thread_id"]
    parts = list(dead.runs.stream(tid, "tools", input=QUESTION))
    assert [p.event for p in parts][-1] == "error" and api["dead"] in str(parts[-1].data)
    assert dead.threads.get(tid)["status"] == "error"
    assert time.monotonic() - started < 30


def _replicas(local_cluster) -> list[dict]:
    from serve.deploy import ServeTarget
    from serve.deploy import client as serve_client

    details = serve_client(ServeTarget(local_cluster.dashboard_url,
                                       local_cluster.auth_headers())).get_serve_details()
    app = (details.get("applications") or {}).get(APP) or {}
    return (app.get("deployments") or {}).get("AgentsApi", {}).get("replicas", [])


def test_a_thread_survives_killing_the_replica(client, local_cluster, record_property):
    tid = client.threads.create()["thread_id"]
    before = client.runs.wait(tid, "tools", input=QUESTION)
    (victim,) = [r for r in _replicas(local_cluster) if r["state"] == "RUNNING"]
    os.kill(victim["pid"], signal.SIGKILL)  # the replica process this module deployed
    killed = time.monotonic()
    deadline = time.monotonic() + 180
    while True:
        running = [r for r in _replicas(local_cluster)
                   if r["state"] == "RUNNING" and r["pid"] != victim["pid"]]
        if running:
            break
        assert time.monotonic() < deadline, "Serve did not restart the agents replica"
        time.sleep(2)
    # Serve's proxy may still route one request to the dead replica (a 5xx): the thread's
    # state is what the test checks, so that request is tried again.
    for attempt in range(10):
        try:
            state = client.threads.get_state(tid)
            break
        except (InternalServerError, httpx.TransportError):
            assert attempt < 9
            time.sleep(3)
    recover_s, failed = time.monotonic() - killed, attempt
    assert state["values"] == before
    after = client.runs.wait(tid, "tools", input={"messages": [
        {"role": "user", "content": "What is 12*7?"}]})
    assert after["messages"][:len(before["messages"])] == before["messages"]
    asked = after["messages"][len(before["messages"])]  # the new turn, after the kept ones
    assert (asked["type"], asked["content"]) == ("human", "What is 12*7?")
    assert client.runs.list(tid)[0]["status"] == "success"
    sent = 2 + (attempt + 1) + 2  # create + run, the get_state tries, run + list
    summary = (f"agents replica killed mid-conversation: {sent} requests sent, {failed} "
               f"failed (retried), thread state answered {recover_s:.0f}s after the kill, "
               "0 messages lost")
    print(summary)
    record_property("summary", summary)
    record_property("requests", sent)
    record_property("failed", failed)
    record_property("recover_s", round(recover_s, 1))


def test_postgresql_down_is_503_and_the_next_request_after_it_is_back_succeeds(
        client, local_cluster, record_property):
    tid = client.threads.create(metadata={"db": "restart"})["thread_id"]
    (pg,) = [p for p in local_cluster.state().processes if p.name == "postgres"]
    # The whole server at once: a backend outlives a SIGKILLed postmaster for a moment and
    # may still answer on a pooled connection (the postmaster leads the process group).
    os.killpg(pg.pid, signal.SIGKILL)
    # SIGKILL lands when each process is next scheduled: on a loaded machine a backend could
    # still answer the first request. The server is down once no process of its group lives.
    from raycluster.local.processes import group_alive

    gone = time.monotonic() + 10
    while group_alive(pg.pid) and time.monotonic() < gone:
        time.sleep(0.05)
    try:
        started = time.monotonic()
        with pytest.raises(httpx.HTTPStatusError) as err:
            client.threads.get(tid)
        assert err.value.response.status_code == 503
        assert err.value.response.json()["error"]["code"] == "database_unavailable"
        refused_s = time.monotonic() - started
        assert refused_s < 15
    finally:
        local_cluster.restart_service("postgres")
    assert client.threads.get(tid)["metadata"]["db"] == "restart"  # the first request after
    recover_s = time.monotonic() - started
    assert client.runs.wait(tid, "tools", input=QUESTION)["messages"][-1]["content"] == ANSWER
    summary = (f"PostgreSQL killed under a thread: 4 requests sent, 1 failed (the 503 "
               f"database_unavailable while it was down, in {refused_s:.1f}s), the first "
               f"request after the restart succeeded {recover_s:.0f}s after the kill, the "
               "thread's metadata and a new run intact")
    print(summary)
    record_property("summary", summary)
    record_property("requests", 4)
    record_property("failed", 1)
    record_property("recover_s", round(recover_s, 1))
