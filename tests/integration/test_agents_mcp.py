"""The platform tools' MCP server deployed on the session's Ray Serve (the cpu pool), used with
the official ``mcp`` client and LangChain's MCP adapters, behind the platform's API key."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agents.mcp_server import mcp_application

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
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": local_cluster.ports["serve"]},
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
    assert names == TOOLS
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


def test_langchain_loads_the_tools_over_mcp(mcp_url, api_key):
    try:
        from langchain_mcp_adapters.client import MultiServerMCPClient
    except ImportError as err:
        # Its releases cap mcp < 2 while vLLM 0.33 (the gpu extra) needs mcp >= 2.2, so the
        # project's lock cannot hold both; a release built for mcp 2 runs this test.
        pytest.skip(f"langchain-mcp-adapters is not installed beside the mcp 2 SDK ({err}); "
                    "install a release built for mcp 2 to run this test")

    async def go():
        client = MultiServerMCPClient({"platform": {
            "transport": "streamable_http", "url": mcp_url,
            "headers": {"Authorization": f"Bearer {api_key}"}}})
        tools = {t.name: t for t in await client.get_tools()}
        return list(tools), await tools["convert_units"].ainvoke(
            {"value": 1.5, "from_unit": "km", "to_unit": "m"})

    names, result = asyncio.run(go())
    assert names == TOOLS
    assert "1500" in str(result)
