"""The graphs an agents app hosts, built from its spec: one assistant per graph id, its id a
UUID derived from the graph id (the same on every replica and every start, so a client may
keep it) and its graph compiled over the app's PostgreSQL checkpointer.

``tools`` calls the spec's model endpoint with the platform tools; ``ops`` reviews the spec's
registered model in MLflow; ``crewai`` / ``autogen`` wrap the framework deployments that
``agents.frameworks`` provides (imported only when the spec names them: their dependencies
live in their own runtime_env).
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from dataclasses import dataclass
from typing import Any

from agents.server.errors import ApiError, not_found
from agents.spec import AgentsAppConfig

#: Namespace of the assistants' ids: uuid5(NAMESPACE, graph_id).
NAMESPACE = uuid.UUID("6f1c1b7e-3a52-5c43-9a43-7f0d5a3b2c10")
FRAMEWORKS = ("crewai", "autogen")
DESCRIPTIONS = {
    "tools": "Answers with the platform's model, calling the calculator, unit converter and "
             "live platform tools (pool units, jobs, registered models).",
    "ops": "Proposes promoting a registered model's candidate to champion and stops for a "
           "person's approval (resume with {'approve': true|false}).",
    "crewai": "A CrewAI crew on the platform's model.",
    "autogen": "An AutoGen AgentChat team on the platform's model.",
}


def assistant_id(graph_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, graph_id))


@dataclass(frozen=True)
class Assistant:
    graph_id: str
    created_at: str

    @property
    def assistant_id(self) -> str:
        return assistant_id(self.graph_id)

    def record(self) -> dict[str, Any]:
        """The SDK's ``Assistant``."""
        return {"assistant_id": self.assistant_id, "graph_id": self.graph_id, "config": {},
                "context": {}, "metadata": {"created_by": "system"}, "version": 1,
                "name": self.graph_id, "description": DESCRIPTIONS.get(self.graph_id),
                "created_at": self.created_at, "updated_at": self.created_at}


class Registry:
    """The assistants of ``config`` (known at once) and their compiled graphs (built by
    :meth:`build` once the checkpointer is up). ``handles``: the framework deployments."""

    def __init__(self, config: AgentsAppConfig, handles: dict[str, Any] | None = None):
        self.config, self.handles = config, dict(handles or {})
        now = dt.datetime.now(dt.UTC).isoformat()
        self.assistants = {g: Assistant(g, now) for g in config.graphs}
        self.graphs: dict[str, Any] = {}

    def find(self, ident: str) -> Assistant:
        """An assistant by its id or its graph id; 404 otherwise."""
        if ident in self.assistants:
            return self.assistants[ident]
        for a in self.assistants.values():
            if a.assistant_id == ident:
                return a
        raise not_found("assistant", ident)

    def search(self, *, graph_id: str | None = None, name: str | None = None,
               metadata: dict | None = None) -> list[Assistant]:
        out = []
        for a in self.assistants.values():
            record = a.record()
            if graph_id and a.graph_id != graph_id or name and a.graph_id != name:
                continue
            if metadata and any(record["metadata"].get(k) != v for k, v in metadata.items()):
                continue
            out.append(a)
        return out

    def graph(self, graph_id: str):
        return self.graphs[graph_id]

    async def build(self, checkpointer: Any) -> None:
        tools = await tools_for(self.config) if "tools" in self.config.graphs else []
        self.graphs = {g: self._compile(g, checkpointer, tools) for g in self.config.graphs}

    def _compile(self, graph_id: str, checkpointer: Any, tools: list):
        cfg = self.config
        if graph_id == "tools":
            from agents.graphs.tools import build_tools_graph

            return build_tools_graph(model_for(cfg), tools, step_limit=cfg.step_limit,
                                     checkpointer=checkpointer, tool_errors=cfg.tool_errors)
        if graph_id == "ops":
            from agents.graphs.ops import build_ops_graph

            return build_ops_graph(tracking_uri=tracking_uri(cfg),
                                   model_name=cfg.registered_model, checkpointer=checkpointer)
        from agents.frameworks import framework_graph

        return framework_graph(graph_id, cfg, self.handles.get(graph_id),
                               checkpointer=checkpointer)


def model_for(cfg: AgentsAppConfig):
    """The chat model of the spec's endpoint: its key from ``api_key_env`` or
    ``api_key_file`` (else the platform defaults), bounded by its timeout and retries."""
    from agents.graphs.model import chat_model

    key = os.environ.get(cfg.model.api_key_env) if cfg.model.api_key_env else None
    return chat_model(base_url=cfg.model.base_url, api_key=key,
                      api_key_file=cfg.model.api_key_file, model=cfg.model.model,
                      timeout=cfg.model.timeout_s, max_retries=cfg.model.max_retries)


def mcp_url(cfg: AgentsAppConfig) -> str:
    """The MCP app beside this one, through Serve's HTTP proxy on this node (HeadOnly
    locally, where the replicas run on the head's host; EveryNode on KubeRay)."""
    port = os.environ.get("RAYPLANE_SERVE_PORT", "8000")
    return f"http://127.0.0.1:{port}{cfg.mcp.route_prefix}"


def first_key(cfg: AgentsAppConfig) -> str | None:
    """A key of the app's own (the MCP app is deployed with the same keys)."""
    keys = cfg.api_keys
    if keys is None:
        return None
    if keys.env and os.environ.get(keys.env):
        return os.environ[keys.env].split(",")[0].strip()
    if keys.file:
        from agents.graphs.model import read_api_key_file

        return read_api_key_file(keys.file)
    return None


async def tools_for(cfg: AgentsAppConfig) -> list:
    """The tools graph's tools: the platform tools in process, or, with
    ``mcp.use_in_graphs``, the MCP app's (each call one MCP tools/call). An MCP server that
    does not answer is a 503 naming it; the next request tries again."""
    if not cfg.mcp.use_in_graphs:
        from agents.platform import platform_tools

        return platform_tools()
    from agents.mcp_tools import aload_mcp_tools
    from agents.platform import TOOL_NAMES
    from raycluster.errors import PlatformError

    try:
        tools = await aload_mcp_tools(mcp_url(cfg), api_key=first_key(cfg),
                                      timeout_s=cfg.model.timeout_s)
    except PlatformError as err:
        raise ApiError(503, str(err), "service_unavailable_error",
                       code="mcp_unavailable") from None
    # The MCP server also offers tools the served model was never trained on (job_estimate):
    # the tools graph declares only the trained prompt's.
    return [t for t in tools if t.name in TOOL_NAMES]


def tracking_uri(cfg: AgentsAppConfig) -> str | None:
    return cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


__all__ = ["NAMESPACE", "Assistant", "Registry", "assistant_id", "model_for", "tracking_uri"]
