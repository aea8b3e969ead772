"""Agent graphs on the platform: compiled LangGraph graphs whose model is any OpenAI-compatible
endpoint (by default the platform's Serve app, reached over HTTP with its API key, never
through serve's internals), the platform tools they run (also served over MCP by
``agents.mcp_server``), the PostgreSQL checkpointer that keeps their threads, and their traces
in MLflow."""

from agents.checkpoint import async_postgres_checkpointer, dsn_from_env, postgres_checkpointer
from agents.graphs import ModelEndpointError, build_ops_graph, build_tools_graph, chat_model
from agents.platform import (
    PLATFORM_TOOLS,
    PlatformContext,
    jobs,
    platform_tools,
    pool_units,
    registered_models,
)
from agents.tracing import enable_tracing, run_config

__all__ = [
    "PLATFORM_TOOLS",
    "ModelEndpointError",
    "PlatformContext",
    "async_postgres_checkpointer",
    "build_ops_graph",
    "build_tools_graph",
    "chat_model",
    "dsn_from_env",
    "enable_tracing",
    "jobs",
    "platform_tools",
    "pool_units",
    "postgres_checkpointer",
    "registered_models",
    "run_config",
]
