"""`rayplane agents up|status|down` on the session's platform, as a user runs them: the local
agents config (agents/configs/local.yaml) with only its model pointed at the session's tiny
model. The replicas find everything else the platform has (the API key file, PostgreSQL's DSN
file, MLflow, the Ray dashboard and its token) through what `up` hands them: the API answers a
run with the platform's model, key and database, the MCP server answers from the live cluster,
and `down` removes both apps and nothing else."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from langgraph_sdk import get_sync_client
from langgraph_sdk.errors import AuthenticationError

from agents.serve_app import DEFAULT_CONFIG
from tests.integration.conftest import rayplane

APP, PREFIX, MCP_PREFIX = "agents-deploy", "/agents-deploy", "/agents-deploy-mcp"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def deployed(local_cluster, cluster_env, agent_model, tmp_path_factory):
    """The shipped local config, renamed and pointed at the tiny model; removed at the end."""
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    doc.update(name=APP, route_prefix=PREFIX, cpus=0.25,
               autoscaling={"min_replicas": 1, "max_replicas": 1},
               mcp={"enabled": True, "route_prefix": MCP_PREFIX})
    doc["model"] = {"base_url": agent_model["base_url"], "model": agent_model["model"],
                    "timeout_s": 60, "max_retries": 0}
    path = tmp_path_factory.mktemp("agents-deploy") / "agents.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = rayplane(cluster_env, "agents", "up", str(path))
    try:
        assert out.returncode == 0, out.stderr + out.stdout
        yield {"path": path, "stdout": out.stdout,
               "key": local_cluster.api_key_path.read_text().strip()}
    finally:
        rayplane(cluster_env, "agents", "down", str(path), timeout=120)


def test_up_prints_the_urls_and_both_apps_run(deployed, local_cluster, cluster_env):
    port = local_cluster.ports["serve"]
    assert f"agents API  http://127.0.0.1:{port}{PREFIX}" in deployed["stdout"]
    assert f"MCP server  http://127.0.0.1:{port}{MCP_PREFIX}" in deployed["stdout"]
    out = rayplane(cluster_env, "agents", "status", str(deployed["path"]), "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    apps = status["applications"]
    assert {name: a["status"] for name, a in apps.items()} == {
        APP: "RUNNING", f"{APP}-mcp": "RUNNING"}
    assert status["urls"] == {"api": f"http://127.0.0.1:{port}{PREFIX}",
                              "mcp": f"http://127.0.0.1:{port}{MCP_PREFIX}"}
    api = apps[APP]["deployments"]["AgentsApi"]
    assert api["deployment_config"]["ray_actor_options"]["resources"] == {"pool:cpu": 0.25}
    # What the replicas were told about the platform: its own addresses and files.
    env_vars = apps[APP]["deployed_app_config"]["runtime_env"]["env_vars"]
    assert env_vars["RAY_ADDRESS"] == local_cluster.dashboard_url
    assert env_vars["RAYPLANE_POSTGRES_DSN_FILE"] == str(local_cluster.postgres.dsn_path)
    assert env_vars["RAYPLANE_API_KEY_FILE"] == str(local_cluster.api_key_path)


def test_the_api_answers_with_the_platforms_model_key_and_database(deployed, local_cluster):
    url = f"{local_cluster.serve_url}{PREFIX}"
    with pytest.raises(AuthenticationError):
        get_sync_client(url=url, api_key="not-a-key", timeout=60).assistants.search()
    client = get_sync_client(url=url, api_key=deployed["key"], timeout=120)
    assert {a["graph_id"] for a in client.assistants.search()} == {"tools", "ops"}
    # A thread: kept in the platform's PostgreSQL (the DSN file), its run answered by the
    # model with the platform's key file, the calculator really run.
    tid = client.threads.create()["thread_id"]
    out = client.runs.wait(tid, "tools", input={"messages": [
        {"role": "user", "content": "What is 12*7?"}]})
    assert out["messages"][-1]["content"] == "12 * 7 = 84."
    assert client.threads.get_state(tid)["values"] == out


def test_the_mcp_server_answers_from_the_live_cluster(deployed, local_cluster):
    from agents.mcp_tools import load_mcp_tools

    url = f"{local_cluster.serve_url}{MCP_PREFIX}"
    accept = {"Accept": "application/json, text/event-stream"}
    refused = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                         headers=accept, timeout=30)
    assert refused.status_code == 401
    tools = {t.name: t for t in load_mcp_tools(url, api_key=deployed["key"])}
    units = tools["pool_units"].invoke({"pool": "a100-mig"})
    units = json.loads(units) if isinstance(units, str) else units
    advertised = sum((n.get("resources_total") or {}).get("pool:a100-mig", 0.0)
                     for n in local_cluster.alive_nodes())
    assert units["pool"] == "a100-mig" and units["total"] == advertised


def test_down_removes_both_apps_and_keeps_the_others(deployed, cluster_env, agent_model,
                                                      local_cluster):
    out = rayplane(cluster_env, "agents", "down", str(deployed["path"]), timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"removed {APP}, {APP}-mcp" in out.stdout
    out = rayplane(cluster_env, "serve", "status", "--json")
    apps = json.loads(out.stdout).get("applications") or {}
    assert APP not in apps and f"{APP}-mcp" not in apps
    assert "agents-model" in apps  # the model the agents called keeps running
    out = rayplane(cluster_env, "agents", "status", str(deployed["path"]))
    assert out.returncode == 2 and f"{APP!r} is not deployed" in out.stderr
