"""MCP tools as LangChain tools: a graph calls the platform tools through the MCP server
(agents/mcp_server.py) the way it would call any other team's MCP server.

LangChain's own adapter (``langchain-mcp-adapters``) cannot be installed beside the ``mcp``
2 SDK the platform uses (vLLM 0.33 needs mcp >= 2.2): its 0.3.2 caps ``mcp < 2`` and 0.3.1
imports names mcp 2 removed. This module is the small part of it a graph needs: list the
server's tools, and turn each into a ``StructuredTool`` whose JSON schema is the server's
``inputSchema`` and whose call is one MCP ``tools/call``.

The server is stateless (any replica answers), so every call opens its own short session: no
session to lose when a replica restarts, at the price of one ``initialize`` round trip
(~ms on loopback).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from langchain_core.tools import StructuredTool, ToolException

from raycluster.errors import PlatformError

DEFAULT_TIMEOUT_S = 30.0


def _headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    if api_key:
        out.setdefault("Authorization", f"Bearer {api_key}")
    return out


@asynccontextmanager
async def mcp_session(url: str, *, api_key: str | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S):
    """An initialized ``mcp.ClientSession`` on the server's streamable HTTP endpoint."""
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    timeout = httpx2.Timeout(timeout_s)
    async with create_mcp_http_client(headers=_headers(api_key, headers), timeout=timeout) as http, \
            streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await asyncio.wait_for(session.initialize(), timeout_s)
        yield session


async def _unreachable(url: str, err: BaseException, headers: Mapping[str, str]
                       ) -> PlatformError:
    # The SDK raises from inside a task group: the cause is the first leaf exception.
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    text = str(err) or type(err).__name__
    # The SDK says only "Server returned an error response": ask once more, plainly, so a
    # refused key is named as such.
    status = await _status(url, headers)
    if status in (401, 403):
        text = f"the server refused the API key ({status})"
    elif status is not None and status >= 400:
        text = f"{text} (HTTP {status})"
    return PlatformError(f"MCP server {url}: {text}")


async def _status(url: str, headers: Mapping[str, str]) -> int | None:
    import httpx

    probe = {"jsonrpc": "2.0", "id": 0, "method": "ping"}
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.post(url, json=probe, headers={
                **headers, "Accept": "application/json, text/event-stream"})
        return response.status_code
    except httpx.HTTPError:
        return None


def _result(result: Any) -> Any:
    """A tool result as the graph's ToolMessage carries it: the structured content when the
    server gives one (the platform tools always do), else the text parts."""
    if result.is_error:
        texts = [getattr(c, "text", "") for c in result.content]
        raise ToolException(" ".join(t for t in texts if t) or "the MCP tool failed")
    if result.structured_content is not None:
        return result.structured_content
    texts = [getattr(c, "text", None) for c in result.content]
    return "\n".join(t for t in texts if t is not None)


def _as_langchain_tool(spec: Any, url: str, api_key: str | None,
                       headers: Mapping[str, str] | None, timeout_s: float) -> StructuredTool:
    name = spec.name

    async def call(**arguments: Any) -> Any:
        try:
            async with mcp_session(url, api_key=api_key, headers=headers,
                                   timeout_s=timeout_s) as session:
                result = await asyncio.wait_for(session.call_tool(name, arguments), timeout_s)
        except ToolException:
            raise
        except BaseException as err:  # noqa: BLE001 - the SDK's task groups raise groups
            if isinstance(err, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            raise ToolException(str(await _unreachable(url, err, _headers(api_key, headers)))
                                ) from None
        return _result(result)

    def call_sync(**arguments: Any) -> Any:
        return asyncio.run(call(**arguments))

    schema = dict(spec.input_schema or {"type": "object", "properties": {}})
    return StructuredTool.from_function(
        func=call_sync, coroutine=call, name=name,
        description=spec.description or name, args_schema=schema,
        # The graph turns a raising tool into an {"error": ...} message by its own policy.
        handle_tool_error=False)


async def aload_mcp_tools(url: str, *, api_key: str | None = None,
                          headers: Mapping[str, str] | None = None,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> list[StructuredTool]:
    """The server's tools, in the order it lists them. Raises a one-line ``PlatformError``
    naming the server when it cannot be reached or refuses the key."""
    try:
        async with mcp_session(url, api_key=api_key, headers=headers,
                               timeout_s=timeout_s) as session:
            listed = await asyncio.wait_for(session.list_tools(), timeout_s)
    except BaseException as err:  # noqa: BLE001 - the SDK's task groups raise groups
        if isinstance(err, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
            raise
        raise await _unreachable(url, err, _headers(api_key, headers)) from None
    return [_as_langchain_tool(t, url, api_key, headers, timeout_s) for t in listed.tools]


def load_mcp_tools(url: str, **kwargs: Any) -> list[StructuredTool]:
    """:func:`aload_mcp_tools` for code without an event loop."""
    return asyncio.run(aload_mcp_tools(url, **kwargs))


def describe(tools: list[StructuredTool]) -> str:
    """One line a tool (name: schema's properties), for logs and the CLI."""
    return "\n".join(f"{t.name}: {json.dumps(t.args)}" for t in tools)


__all__ = ["aload_mcp_tools", "describe", "load_mcp_tools", "mcp_session"]
