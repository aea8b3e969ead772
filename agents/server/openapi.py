"""The agents API's OpenAPI document (``GET /openapi.json``, no key): every route's answer
as LangGraph's server API has it, every refusal in the one error shape
(``serve.protocol.ErrorResponse``) with the statuses a route can answer, and the key
(``x-api-key`` or ``Authorization: Bearer``). Clients and schemathesis generate from it.

The answers are documented, not enforced (the routes keep ``response_model=None``): the
document describes what the handlers return, and tests/reliability/test_schemathesis.py
checks every answer against it over HTTP.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.protocol import ErrorResponse


class _Answer(BaseModel):
    """An answer object: the fields named here, and perhaps more."""

    model_config = ConfigDict(extra="allow")


class Assistant(_Answer):
    assistant_id: str = Field(description="uuid5 of the graph id, the same on every replica.")
    graph_id: str
    config: dict[str, Any]
    context: dict[str, Any]
    metadata: dict[str, Any]
    version: int
    name: str
    description: str | None
    created_at: str
    updated_at: str


class GraphSchemas(_Answer):
    graph_id: str
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None
    state_schema: dict[str, Any] | None
    config_schema: dict[str, Any] | None
    context_schema: dict[str, Any] | None


class Thread(_Answer):
    thread_id: str
    created_at: str
    updated_at: str
    metadata: dict[str, Any]
    status: Literal["idle", "busy", "interrupted", "error"]
    values: dict[str, Any] | list[Any] | None
    interrupts: dict[str, Any]


class ThreadCheckpoint(_Answer):
    thread_id: str | None
    checkpoint_ns: str
    checkpoint_id: str | None
    checkpoint_map: dict[str, Any] | None


class CheckpointRef(_Answer):
    """``POST /threads/{id}/state``: the checkpoint the update wrote."""

    checkpoint: ThreadCheckpoint | None


class ThreadState(_Answer):
    values: dict[str, Any] | list[Any] | None
    next: list[str]
    checkpoint: ThreadCheckpoint | None
    metadata: dict[str, Any]
    created_at: str | None
    parent_checkpoint: ThreadCheckpoint | None
    tasks: list[dict[str, Any]]
    interrupts: list[Any]


class Run(_Answer):
    run_id: str
    thread_id: str
    assistant_id: str
    created_at: str
    updated_at: str
    status: Literal["pending", "running", "success", "error", "interrupted"]
    metadata: dict[str, Any]
    multitask_strategy: Literal["reject", "enqueue", "interrupt", "rollback"]
    kwargs: dict[str, Any]


_ERRORS = {
    400: "The body is not JSON.",
    401: "Missing or incorrect API key.",
    404: "No such assistant, thread, run or route.",
    409: "The thread is busy, exists already, or belongs to another graph.",
    422: "A field is invalid (named in param), or the run's input was refused.",
    500: "Internal error (the exception named).",
    502: "The graphs' model endpoint failed.",
    503: "PostgreSQL (or the MCP server) is unavailable; retry.",
}
#: The statuses every keyed route may answer, in the one error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}


def answers(model: Any) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route whose 200 answer is ``model`` (documented only)."""
    return {200: {"model": model, "description": "OK"}}


#: One server-sent event of a streamed run: its name and one line of JSON (an ``error``
#: event's JSON is the error shape).
SSE_EVENT: dict[str, Any] = {
    "type": "object", "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                   "data": {"type": "string", "contentMediaType": "application/json"}},
    "if": {"properties": {"event": {"const": "error"}}},
    "then": {"properties": {"data": {"contentSchema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}},
}


def stream_ok() -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a streaming run: server-sent events, ``event:`` + ``data:`` JSON."""
    return {200: {"description": "`metadata`, the asked modes' events, then `end` (or "
                                 "`error` in the error shape)",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def document_openapi(doc: dict[str, Any], keyed: set[tuple[str, str]]) -> dict[str, Any]:
    """FastAPI's document with the key's security schemes on the ``keyed`` (path, method)
    operations, and without FastAPI's own 422 body, which this API never answers."""
    components = doc.setdefault("components", {})
    components["securitySchemes"] = {
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        "bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            op["security"] = [{"apiKey": []}, {"bearer": []}] if (path, method) in keyed else []
            if (path, method) not in keyed:
                op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    return doc


__all__ = ["ERROR_RESPONSES", "Assistant", "CheckpointRef", "GraphSchemas", "Run",
           "Thread", "ThreadCheckpoint", "ThreadState", "answers", "document_openapi", "stream_ok"]
