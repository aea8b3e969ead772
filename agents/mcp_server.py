"""The platform's tools as an MCP server, on Ray Serve behind the platform's API key.

:func:`build_server` is an ``MCPServer`` (the ``mcp`` SDK; FastMCP in SDK 1.x) exposing
:data:`agents.platform.PLATFORM_TOOLS` and the tools the platform's served model was not
trained on (``job_estimate``; ``platform_tools(untrained=True)``). Over HTTP it speaks MCP's
streamable HTTP transport, stateless and with JSON responses: no request depends on a session
kept by one replica, so any replica of the Serve deployment can answer any request.

:class:`McpApp` is the ASGI app a replica serves: the API key check (``Authorization: Bearer``,
the keys of ``serve.auth.ApiKeyStore``; 401 with OpenAI's error body) in front of the SDK's
session manager, whose task group it runs for the replica's lifetime from the ASGI lifespan
(Ray Serve runs an ingress's lifespan when the replica starts and stops). The MCP endpoint is
the application's ``route_prefix`` itself (e.g. ``http://127.0.0.1:8000/mcp``).

``build_mcp_app(args)`` is the Serve config's ``import_path`` target
(``agents.mcp_server:build_mcp_app``); :func:`mcp_application` renders that application.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ray import serve

from agents.platform import (
    ADDRESS_ENV,
    FEATURE_STORE_ENV,
    MLFLOW_ENV,
    TOKEN_PATH_ENV,
    PlatformContext,
    platform_tools,
)
from raycluster.catalog import POOL_RESOURCE_PREFIX
from serve.auth import ApiKeyStore, authenticate

SERVER_NAME = "rayplane-platform"
INSTRUCTIONS = ("Tools of the rayplane platform: live pool capacity (free GPU units), Ray jobs, "
                "registered models, a job's expected wait and run time (job_estimate: the "
                "job-duration model on the pool's online features), and the calculator / "
                "unit conversion / pool facts the platform's model was trained with. Results "
                'are JSON; a failure is {"error": "..."}.')
DEPLOYMENT = "mcp"
IMPORT_PATH = "agents.mcp_server:build_mcp_app"


def build_server(context: PlatformContext | None = None):
    """The MCP server exposing the platform tools, bound to ``context`` (default: the
    environment's platform, read at each call)."""
    from mcp.server.mcpserver import MCPServer

    server = MCPServer(name=SERVER_NAME, instructions=INSTRUCTIONS)
    for tool in platform_tools(context, untrained=True):
        server.add_tool(tool, name=tool.__name__, description=tool.__doc__)
    return server


def _session_manager(server):
    """The server's streamable-HTTP session manager: stateless, JSON responses. DNS-rebinding
    protection (a browser defence for servers on a developer's localhost) is off: requests
    arrive through the Serve proxy under whatever host name the cluster is reached by, and
    the API key is what admits them."""
    from mcp.server.transport_security import TransportSecuritySettings

    server.streamable_http_app(
        stateless_http=True, json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    return server.session_manager


class McpApp:
    """ASGI app: API key check, then MCP's streamable HTTP transport for every path under the
    route prefix. Its lifespan runs the session manager (``run()``: the task group in which
    stateless requests are served), so it must be served by something that runs the ASGI
    lifespan (Ray Serve's ingress does; so does uvicorn)."""

    def __init__(self, server, keys: ApiKeyStore | None):
        self.keys = keys
        self.manager = _session_manager(server)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.keys is not None:
            headers = dict(scope.get("headers") or [])
            refused = authenticate(self.keys, headers.get(b"authorization", b"").decode("latin-1"))
            if refused is not None:
                await _json(send, 401, refused, {"www-authenticate": "Bearer"})
                return
        await self.manager.handle_request(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with self.manager.run():
                await send({"type": "lifespan.startup.complete"})
                started = True
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as err:  # noqa: BLE001 - reported through the lifespan protocol
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": str(err)})
            return
        await send({"type": "lifespan.shutdown.complete"})


async def _json(send, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def platform_context(overrides: dict[str, Any] | None = None) -> PlatformContext:
    """The context from the environment, with ``overrides`` (``dashboard_url``,
    ``token_path``, ``mlflow_uri``, ``feature_store``; ``${VAR}`` expanded) taking precedence.
    PlatformError (one line) when no dashboard URL results."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {"dashboard_url", "token_path", "mlflow_uri", "feature_store"}
    if unknown:
        from raycluster.spec import SpecError

        raise SpecError(f"platform: unknown keys {sorted(unknown)}; valid: dashboard_url, "
                        "token_path, mlflow_uri, feature_store", field="platform")
    env = dict(os.environ)
    for key, var in (("dashboard_url", ADDRESS_ENV), ("token_path", TOKEN_PATH_ENV),
                     ("mlflow_uri", MLFLOW_ENV), ("feature_store", FEATURE_STORE_ENV)):
        if overrides.get(key):
            env[var] = os.path.expandvars(str(overrides[key]))
    return PlatformContext.from_env(env)


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=32,
                  ray_actor_options={"num_cpus": 0.1,
                                     "resources": {f"{POOL_RESOURCE_PREFIX}cpu": 0.1}})
@serve.ingress()
class McpIngress:
    """A Serve replica serving :class:`McpApp` (the platform tools over MCP)."""

    def __init__(self, api_keys: dict[str, str] | None, platform: dict[str, Any] | None = None):
        if not api_keys:
            raise ValueError("api_keys: the MCP server refuses to run without API keys "
                             "({env: VAR} or {file: PATH})")
        self.keys = ApiKeyStore(env=api_keys.get("env"), file=api_keys.get("file"))
        self.context = platform_context(platform)

    def __serve_build_asgi_app__(self) -> McpApp:
        return McpApp(build_server(self.context), self.keys)


def build_mcp_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application of ``args``: ``api_keys`` ({env, file}, required) and
    ``platform`` (optional ``dashboard_url``, ``token_path``, ``mlflow_uri``,
    ``feature_store``, overriding the replica's environment)."""
    return McpIngress.bind(args.get("api_keys"), args.get("platform"))


def mcp_application(*, name: str = "mcp", route_prefix: str = "/mcp",
                    api_keys: dict[str, str], platform: dict[str, Any] | None = None,
                    replicas: int = 1, cpus: float = 0.1, pool: str = "cpu") -> dict[str, Any]:
    """One application of a Serve config (``applications: [...]``) hosting the MCP server on
    ``pool``: ``cpus`` cores and as much of the pool resource (it counts cores on a CPU pool)."""
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": {"api_keys": api_keys, "platform": platform or {}},
        "deployments": [{
            "name": DEPLOYMENT,
            "num_replicas": replicas,
            "ray_actor_options": {"num_cpus": cpus, "resources": {f"{POOL_RESOURCE_PREFIX}{pool}": cpus}},
        }],
    }


__all__ = ["IMPORT_PATH", "McpApp", "McpIngress", "build_mcp_app", "build_server",
           "mcp_application", "platform_context"]
