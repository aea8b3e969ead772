"""Compiled LangGraph graphs over the platform's served model and tools: ``tools`` (the
model answers with tool calls) and ``ops`` (a promotion proposal a person approves)."""

from agents.graphs.model import ModelEndpointError, chat_model
from agents.graphs.ops import build_ops_graph
from agents.graphs.tools import build_tools_graph

__all__ = ["ModelEndpointError", "build_ops_graph", "build_tools_graph", "chat_model"]
