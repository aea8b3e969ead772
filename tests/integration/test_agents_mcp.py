"""The platform tools' MCP server deployed on the session's Ray Serve (the cpu pool), used with
the official ``mcp`` client and as LangChain tools (agents.mcp_tools) in the tools graph,
behind the platform's API key."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agents.mcp_server import mcp_application
from raycluster.errors import PlatformError

pytestmark = pytest.mark.timeout(600)

APP = "agents-mcp-tests"
PREFIX = "/mcp-tests"
POOL = "a100-mig"
TOOLS = ["pool_units", "jobs", "registered_models", "calculator", "convert_units", "pool_info"]


def _advertised(local_cluster, resource: str) -> float:
    return sum((n.get("resources_total") or {}).get(resource, 0.0)
               for n in local_cluster.alive_nodes())


@pytest.fixture(scope="module")
def mcp_url(local_cluster):
    """The MCP app deployed through the dashboard's Serve REST API beside whatever runs there,
    removed at the end. Its platform overrides name only the dashboard: the replica reads the
    token path and MLflow URI from the environment the platform gives Ray's workers."""
    from serve.deploy import (
        ServeTarget,
        client,
        merge_applications,
        remove_applications,
        wait_running,
    )

    serve_client = client(ServeTarget(local_cluster.dashboard_url, local_cluster.auth_headers()))
    config = {
        # The platform's Serve layout: a proxy per node with replicas, the head's on its own
        # port, all behind the platform's ingress (raycluster/local/ingress.py).
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": local_cluster.ports["serve_head"]},
        "applications": [mcp_application(
            name=APP, route_prefix=PREFIX,
            api_keys={"file": str(local_cluster.api_key_path)},
            platform={"dashboard_url": local_cluster.dashboard_url})],
    }
    serve_client.deploy_applications(merge_applications(serve_client.get_serve_details(),
                                                        config))
    try:
        details = wait_running(serve_client, APP, timeout=300)
        # On the cpu pool, as the placement contract says.
        (deployment,) = details["deployments"].values()
        resources = deployment["deployment_config"]["ray_actor_options"]["resources"]
        assert resources == {"pool:cpu": 0.1}
        yield f"{local_cluster.serve_url}{PREFIX}"
    finally:
        remove_applications(serve_client, lambda name: name == APP)


@pytest.fixture(scope="module")
def api_key(local_cluster) -> str:
    return local_cluster.api_key_path.read_text().strip()


def _session_calls(url: str, headers: dict[str, str]):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async def go():
        async with create_mcp_http_client(headers=headers) as http, \
                streamable_http_client(url, http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            names = [t.name for t in (await session.list_tools()).tools]
            units = await session.call_tool("pool_units", {"pool": POOL})
            calc = await session.call_tool("calculator", {"expression": "(3+4)*5"})
            return names, units, calc

    return asyncio.run(go())


def test_mcp_client_lists_and_calls_the_tools(mcp_url, api_key, local_cluster):
    names, units, calc = _session_calls(mcp_url, {"Authorization": f"Bearer {api_key}"})
    assert names == [*TOOLS, "job_estimate"]
    assert not units.is_error
    assert units.structured_content["pool"] == POOL
    assert units.structured_content["total"] == _advertised(local_cluster, f"pool:{POOL}")
    assert calc.structured_content == {"result": 35}


def test_mcp_refuses_without_or_with_a_wrong_key(mcp_url):
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}
    missing = httpx.post(mcp_url, json=request, headers=accept, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.post(mcp_url, json=request, timeout=30,
                       headers={**accept, "Authorization": "Bearer not-a-key"})
    assert wrong.status_code == 401
    assert wrong.json()["error"] == {"message": "Incorrect API key provided.",
                                     "type": "authentication_error", "param": None,
                                     "code": "invalid_api_key"}
    # The official client fails too: the server never answers its handshake.
    with pytest.raises(BaseException):  # noqa: B017 - the SDK wraps the 401 in a task group
        _session_calls(mcp_url, {"Authorization": "Bearer not-a-key"})


def test_langchain_tools_over_mcp_list_call_and_refuse_a_wrong_key(mcp_url, api_key):
    """agents.mcp_tools: the server's tools as LangChain tools (langchain-mcp-adapters does not
    run on the mcp 2 SDK), each call one MCP tools/call; a wrong key is a one-line error
    naming the server."""
    from agents.mcp_tools import aload_mcp_tools, load_mcp_tools

    async def go():
        tools = {t.name: t for t in await aload_mcp_tools(mcp_url, api_key=api_key)}
        return tools, await tools["convert_units"].ainvoke(
            {"value": 1.5, "from_unit": "km", "to_unit": "m"})

    tools, result = asyncio.run(go())
    assert list(tools) == [*TOOLS, "job_estimate"]
    assert result == {"result": 1500, "unit": "m"} or "1500" in str(result)
    # The schema the model sees is the server's: the calculator takes one expression.
    assert list(tools["calculator"].args) == ["expression"]
    # A sync caller gets the same tools.
    assert [t.name for t in load_mcp_tools(mcp_url, api_key=api_key)] == [*TOOLS, "job_estimate"]
    with pytest.raises(PlatformError, match=f"MCP server {mcp_url}: .*401"):
        load_mcp_tools(mcp_url, api_key="not-a-key", timeout_s=20)


def test_tools_graph_runs_its_tools_over_mcp(mcp_url, local_cluster, agent_model, monkeypatch):
    """An agents app with ``mcp.use_in_graphs``: its tools graph loads every tool from the MCP
    app (through this host's Serve proxy, with the app's own key); the served model asks for
    the calculator, the call goes over MCP to the Serve replica, the answer uses its result."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langgraph.checkpoint.memory import InMemorySaver

    from agents.server.graphs import Registry
    from agents.spec import AgentsAppConfig

    monkeypatch.setenv("RAYPLANE_SERVE_PORT", str(local_cluster.ports["serve"]))
    config = AgentsAppConfig.parse({
        "graphs": ["tools"], "tracing": False,
        "model": {"base_url": agent_model["base_url"], "model": agent_model["model"],
                  "api_key_file": agent_model["key_file"], "timeout_s": 60},
        "mcp": {"route_prefix": PREFIX, "use_in_graphs": True},
        "api_keys": {"file": str(local_cluster.api_key_path)}})
    registry = Registry(config, {})

    async def go():
        await registry.build(InMemorySaver())
        graph = registry.graph("tools")
        return await graph.ainvoke({"messages": [("user", "What is 12*7?")]},
                                   {"configurable": {"thread_id": "mcp"}})

    out = asyncio.run(go())
    _, call, result, answer = out["messages"]
    assert isinstance(call, AIMessage) and call.tool_calls[0]["name"] == "calculator"
    assert isinstance(result, ToolMessage) and result.status == "success"
    assert "84" in str(result.content)
    assert "84" in answer.content and out["status"] == "answered"
