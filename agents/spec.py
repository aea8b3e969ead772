"""The agents app's spec: which graphs the ``agents`` Serve application hosts, the model
endpoint they call, where threads live, the MCP server beside it, the pool it runs on, its
autoscaling and its API keys.

One file deploys locally (``rayplane agents up -f agents/configs/local.yaml``) and renders
into a KubeRay RayService in the ``agentic`` namespace (``rayplane render agents``). Secrets
are never in it: the model's API key, the checkpointer's DSN and the app's own API keys are
named by environment variable or file (a Kubernetes Secret on EKS).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raycluster.spec import Spec
from serve.config import ApiKeys, Autoscaling, check_api_keys

#: The graphs an agents app can host; each is an assistant of the LangGraph server API
#: (its ``graph_id``). crewai and autogen run their framework's example behind the same API.
GraphId = Literal["tools", "ops", "crewai", "autogen"]
GRAPH_IDS: tuple[str, ...] = ("tools", "ops", "crewai", "autogen")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _route_prefix(value: str) -> str:
    if not value.startswith("/") or value == "/":
        raise ValueError("must start with '/' and name a path, e.g. /agents")
    return value.rstrip("/")


def _env_name(field: str, value: str | None) -> str | None:
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError(f"{field}: {value!r} is not an environment variable name")
    return value


class ModelEndpoint(Spec):
    """The OpenAI-compatible endpoint the graphs' model calls go to."""

    base_url: str | None = Field(default=None, description=(
        "Base URL ending in /v1 (default: OPENAI_BASE_URL on the nodes: the platform's "
        "OpenAI Serve app)."))
    model: str = Field(default="rayplane-tool-llm", description="Served model name.")
    api_key_env: str | None = Field(default=None, description=(
        "Environment variable holding the endpoint's API key (default: OPENAI_API_KEY, else "
        "the key file RAYPLANE_API_KEY_FILE)."))
    api_key_file: str | None = Field(default=None, description=(
        "File whose first line is the endpoint's API key."))
    timeout_s: float = Field(default=30.0, gt=0, description=(
        "Per model call; a run whose model does not answer in time fails with 502/503 "
        "naming the endpoint."))
    max_retries: int = Field(default=1, ge=0, le=5, description="Retries of one model call.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        return _env_name("api_key_env", v)


class Checkpointer(Spec):
    """Where threads live: LangGraph's PostgreSQL checkpointer."""

    dsn_env: str | None = Field(default=None, description=(
        "Environment variable holding the DSN (on EKS: from the Secret of the RDS database "
        "Terraform creates). Default: RAYPLANE_AGENTS_DSN, else the file "
        "RAYPLANE_POSTGRES_DSN_FILE names (the local platform's)."))
    pool_max_size: int = Field(default=8, ge=1, le=100, description=(
        "Connections per replica (health-checked; a restarted database is reconnected)."))
    timeout_s: float = Field(default=5.0, gt=0, description=(
        "Wait for a connection before answering 503."))

    @field_validator("dsn_env")
    @classmethod
    def _dsn_env(cls, v: str | None) -> str | None:
        return _env_name("dsn_env", v)


class McpSpec(Spec):
    """The platform tools' MCP server, deployed beside the agents app."""

    enabled: bool = Field(default=True, description="Deploy the MCP server application.")
    route_prefix: str = Field(default="/mcp", description="Its HTTP route prefix.")
    use_in_graphs: bool = Field(default=False, description=(
        "The tools graph loads the platform tools over MCP (langchain-mcp-adapters) instead "
        "of calling them in process."))

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return _route_prefix(v)


class AgentsAppConfig(Spec):
    """An agents Serve application: LangGraph graphs behind the LangGraph server API."""

    spec_kind = "agents config"

    name: str = Field(default="agents", description="Serve application name.")
    route_prefix: str = Field(default="/agents", description="HTTP route prefix of the API.")
    graphs: list[GraphId] = Field(default_factory=lambda: ["tools", "ops"], min_length=1,
                                  description="Graphs hosted, one assistant each.")
    model: ModelEndpoint = Field(default_factory=ModelEndpoint,
                                 description="The model the graphs call.")
    registered_model: str = Field(default="rayplane-tool-llm", description=(
        "Registered model whose candidate and champion the ops graph compares."))
    mlflow_tracking_uri: str | None = Field(default=None, description=(
        "MLflow for the ops graph's registry and the runs' traces (default: the nodes' "
        "MLFLOW_TRACKING_URI)."))
    tracing: bool = Field(default=True, description="Every run is an MLflow trace.")
    step_limit: int = Field(default=6, ge=1, le=50, description=(
        "Most model calls in one run of the tools graph (a runaway loop ends with status "
        "step_limit)."))
    tool_errors: Literal["continue", "stop"] = Field(default="continue", description=(
        "A tool that raises: continue (the model sees the error and goes on) or stop (the "
        "run ends with status tool_error)."))
    checkpointer: Checkpointer = Field(default_factory=Checkpointer,
                                       description="Where threads live.")
    mcp: McpSpec = Field(default_factory=McpSpec, description="The MCP server.")
    pool: str = Field(default="cpu", description=(
        "Pool whose nodes run the replicas (the MIG pool for critical agents)."))
    priority_class: str | None = Field(default=None, description=(
        "Kubernetes priority class of the RayService's pods (default: the pool's; "
        "critical-agents on the MIG pool when configured)."))
    cpus: float = Field(default=0.5, gt=0, description="CPU cores per replica.")
    max_ongoing_requests: int = Field(default=64, ge=1,
                                      description="Concurrent requests per replica.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling,
                                     description="Replica autoscaling.")
    api_keys: ApiKeys | None = Field(default=None, description=(
        "Where the API's keys are read (the OpenAI app's keys work too when they share "
        "the file)."))
    allow_unauthenticated: bool = Field(default=False, description=(
        "Serve without API keys (must be said explicitly; never in production)."))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty: it names the Serve application")
        return v

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return _route_prefix(v)

    @model_validator(mode="after")
    def _consistent(self) -> AgentsAppConfig:
        if len(set(self.graphs)) != len(self.graphs):
            raise ValueError(f"graphs: {self.graphs} names a graph twice")
        if self.mcp.enabled and self.mcp.route_prefix == self.route_prefix:
            raise ValueError(f"mcp.route_prefix: {self.mcp.route_prefix!r} is the app's own "
                             "route_prefix; give the MCP server its own")
        if self.mcp.use_in_graphs and not self.mcp.enabled:
            raise ValueError("mcp.use_in_graphs: true needs mcp.enabled: true")
        check_api_keys(self.api_keys, self.allow_unauthenticated)
        return self


__all__ = ["GRAPH_IDS", "AgentsAppConfig", "Checkpointer", "GraphId", "McpSpec", "ModelEndpoint"]
