"""The platform tools and the MCP server, without a cluster: the re-exported trained tools,
error results (unknown pool, no platform), the usage text Ray's own formatter writes, the tool
schemas LangChain and MCP see, and the MCP server over real HTTP behind the API key."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from agents import platform
from agents.mcp_server import (
    McpApp,
    build_mcp_app,
    build_server,
    mcp_application,
    platform_context,
)
from agents.platform import PLATFORM_TOOLS, PlatformContext, parse_pool_usage, pool_units
from raycluster.errors import PlatformError
from raycluster.spec import SpecError
from serve.auth import ApiKeyStore
from train import tools as train_tools

EXPECTED = ["pool_units", "jobs", "registered_models", "calculator", "convert_units",
            "pool_info"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def nowhere() -> PlatformContext:
    """A context whose dashboard URL nothing answers."""
    return PlatformContext(f"http://127.0.0.1:{_closed_port()}", timeout=2.0)


# -- the tools the model was trained on ----------------------------------------------------


def test_trained_tools_are_the_real_implementations():
    assert platform.calculator is train_tools.calculator
    assert platform.convert_units is train_tools.convert_units
    assert platform.pool_info is train_tools.pool_info
    assert platform.calculator("12*7") == {"result": 84}
    assert platform.convert_units(2.5, "km", "m") == {"result": 2500}
    assert platform.calculator("1/0") == {"error": "division by zero"}


def test_tool_list_names_and_trained_descriptions():
    by_name = {t.__name__: t for t in PLATFORM_TOOLS}
    assert list(by_name) == EXPECTED
    trained = {t["function"]["name"]: t["function"]["description"] for t in train_tools.TOOLS}
    for name, description in trained.items():
        assert by_name[name].__doc__ == description
    # The tool wrappers run the real implementations.
    assert by_name["calculator"](expression="(3+4)*5") == {"result": 35}
    assert by_name["convert_units"](value=3, from_unit="h", to_unit="min") == {"result": 180}
    assert by_name["pool_info"](pool="a100-mig", fact="sharing") == \
        {"pool": "a100-mig", "sharing": "MIG 3g.40gb"}


def test_langchain_sees_typed_args_without_the_context():
    from langchain_core.tools import StructuredTool

    tools = {t.__name__: StructuredTool.from_function(t) for t in PLATFORM_TOOLS}
    assert set(tools["pool_units"].args) == {"pool"}
    assert tools["pool_units"].args["pool"]["type"] == "string"
    assert tools["jobs"].args["limit"]["default"] == 10
    assert tools["pool_info"].args["fact"]["enum"] == list(train_tools.POOL_FACTS)
    assert "free" in tools["pool_units"].description
    assert tools["calculator"].invoke({"expression": "6*7"}) == {"result": 42}


# -- error results -------------------------------------------------------------------------


def test_unknown_pool_is_an_error_result_naming_the_pools(nowhere):
    result = pool_units("a100-mg", context=nowhere)
    assert set(result) == {"error"}
    assert "did you mean 'a100-mig'?" in result["error"]
    for pool in ("cpu", "a100-timeslice", "a100-mig", "h100-timeslice"):
        assert pool in result["error"]


def test_unreachable_platform_is_an_error_result_not_an_exception(nowhere):
    for result in (pool_units("a100-mig", context=nowhere), platform.jobs(context=nowhere)):
        assert set(result) == {"error"}
        assert "no Ray dashboard answers at" in result["error"]
        assert "\n" not in result["error"]


def test_registered_models_without_mlflow_says_what_to_set():
    result = platform.registered_models(context=PlatformContext("http://127.0.0.1:1"))
    assert "MLFLOW_TRACKING_URI" in result["error"]


def test_context_from_env(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    ctx = PlatformContext.from_env({"RAY_ADDRESS": "http://127.0.0.1:8265/",
                                    "RAY_AUTH_TOKEN_PATH": str(token),
                                    "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert ctx.dashboard_url == "http://127.0.0.1:8265"
    assert ctx.headers == {"Authorization": "Bearer s3cret"}
    assert ctx.mlflow_uri == "http://127.0.0.1:5000"
    with pytest.raises(PlatformError, match="RAY_ADDRESS is not set"):
        PlatformContext.from_env({})
    with pytest.raises(PlatformError, match="not the Ray dashboard's http URL"):
        PlatformContext.from_env({"RAY_ADDRESS": "ray://127.0.0.1:10001"})
    with pytest.raises(PlatformError, match="cannot read the Ray token"):
        PlatformContext.from_env({"RAY_ADDRESS": "http://x:1",
                                  "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_platform_overrides_and_unknown_keys(tmp_path):
    ctx = platform_context({"dashboard_url": "http://10.0.0.1:8265", "mlflow_uri": "http://m:5"})
    assert (ctx.dashboard_url, ctx.mlflow_uri) == ("http://10.0.0.1:8265", "http://m:5")
    with pytest.raises(SpecError, match="dashbord_url"):
        platform_context({"dashbord_url": "http://x:1"})


# -- live usage as the dashboard reports it ----------------------------------------------------


def test_usage_text_of_rays_own_formatter():
    """Ray's ``parse_usage`` writes the node summary's lines; a placement group's reserved
    units are shown as free there but are not."""
    from ray.autoscaler._private.util import parse_usage

    pg = "0123456789abcdef0123456789abcdef01000000"
    node_a = "\n".join(parse_usage({"pool:a100-mig": (1.0, 3.0), "CPU": (0.0, 0.0),
                                    "node:127.0.0.1": (0.0, 1.0)}, verbose=True))
    node_b = "\n".join(parse_usage({"pool:a100-mig": (2.0, 3.0),
                                    f"pool:a100-mig_group_{pg}": (0.0, 2.0),
                                    f"pool:a100-mig_group_0_{pg}": (0.0, 2.0),
                                    "pool:a100-mig-x": (0.0, 5.0)}, verbose=True))
    assert "reserved in placement groups" in node_b
    total, used, nodes = parse_pool_usage({"a": node_a, "b": node_b}, "pool:a100-mig")
    assert (total, used, nodes) == (6.0, 3.0, 2)
    assert parse_pool_usage({"a": node_a}, "pool:cpu") == (0.0, 0.0, 0)


# -- the MCP server --------------------------------------------------------------------------


def test_mcp_server_lists_and_calls_the_tools(nowhere):
    from mcp import Client

    async def go():
        async with Client(build_server(nowhere)) as client:
            listed = (await client.list_tools()).tools
            called = await client.call_tool("calculator", {"expression": "12*7"})
            failed = await client.call_tool("pool_units", {"pool": "a100-mig"})
            return listed, called, failed

    listed, called, failed = asyncio.run(go())
    tools = {t.name: t for t in listed}
    # The MCP server lists the untrained tools after the trained prompt's.
    assert list(tools) == [*EXPECTED, "job_estimate"]
    assert tools["pool_units"].input_schema["required"] == ["pool"]
    assert set(tools["pool_units"].input_schema["properties"]) == {"pool"}
    assert tools["pool_info"].input_schema["properties"]["fact"]["enum"] == \
        list(train_tools.POOL_FACTS)
    assert called.structured_content == {"result": 84}
    assert not called.is_error
    assert "no Ray dashboard answers" in failed.structured_content["error"]


@pytest.fixture(scope="module")
def mcp_http(nowhere, monkeypatch_module):
    """The replica's ASGI app (API key, lifespan-run session manager) under uvicorn."""
    import uvicorn

    monkeypatch_module.setenv("RAYPLANE_TEST_MCP_KEYS", "key-one,key-two")
    app = McpApp(build_server(nowhere), ApiKeyStore(env="RAYPLANE_TEST_MCP_KEYS"))
    port = _closed_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/mcp"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_mcp_http_refuses_without_a_valid_key(mcp_http):
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    missing = httpx.post(mcp_http, json=request)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(mcp_http, json=request, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"


def test_mcp_http_serves_the_tools_with_a_key(mcp_http):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async def go():
        async with create_mcp_http_client(headers={"Authorization": "Bearer key-two"}) as http, \
                streamable_http_client(mcp_http, http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            names = [t.name for t in (await session.list_tools()).tools]
            result = await session.call_tool("convert_units",
                                             {"value": 2, "from_unit": "GB", "to_unit": "MB"})
            return names, result

    names, result = asyncio.run(go())
    assert names == [*EXPECTED, "job_estimate"]
    assert result.structured_content == {"result": 2000}


def test_serve_application_config():
    app = mcp_application(api_keys={"file": "${RAYPLANE_STATE_DIR}/api_key"}, replicas=2)
    assert app["import_path"] == "agents.mcp_server:build_mcp_app"
    assert app["route_prefix"] == "/mcp"
    (deployment,) = app["deployments"]
    assert deployment["num_replicas"] == 2
    assert deployment["ray_actor_options"]["resources"] == {"pool:cpu": 0.1}
    from ray.serve import Application

    assert isinstance(build_mcp_app(app["args"]), Application)
