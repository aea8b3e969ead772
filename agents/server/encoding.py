"""JSON and server-sent events of the agents API: LangChain messages, LangGraph interrupts and
snapshots in the shapes LangGraph's own server sends (a message is its pydantic dump:
``{"type": "ai", "content": ..., "tool_calls": [...], "id": ...}``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any


def jsonable(obj: Any) -> Any:
    """``obj`` with every LangChain message, interrupt, pydantic model, tuple and datetime
    turned into plain JSON values."""
    return json.loads(dumps(obj))


def _default(obj: Any) -> Any:
    from langgraph.types import Interrupt

    if isinstance(obj, Interrupt):
        out = {"value": obj.value, "id": obj.id}
        schema = getattr(obj, "response_schema", None)
        if schema is not None:
            out["response_schema"] = (schema.model_json_schema()
                                      if hasattr(schema, "model_json_schema") else schema)
        return out
    if hasattr(obj, "model_dump") and not isinstance(obj, type):
        return obj.model_dump(mode="json")
    if isinstance(obj, type) and hasattr(obj, "model_json_schema"):
        return obj.model_json_schema()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return repr(obj)


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_default, ensure_ascii=False, separators=(",", ":"))


def sse_event(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One server-sent event: ``event:`` name and one ``data:`` line of JSON, as the SDK's
    decoder (langgraph_sdk/sse.py) reads them."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return f"{head}data: {dumps(data)}\n\n".encode()


def wire_mode(mode: str) -> str:
    """The LangGraph stream mode a client's mode runs as (``messages-tuple`` is ``messages``)."""
    return "messages" if mode == "messages-tuple" else mode


def checkpoint_ref(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The SDK's ``Checkpoint`` of a snapshot's config."""
    if not config:
        return None
    c = config.get("configurable", {})
    return {"thread_id": c.get("thread_id"), "checkpoint_ns": c.get("checkpoint_ns", ""),
            "checkpoint_id": c.get("checkpoint_id"), "checkpoint_map": c.get("checkpoint_map")}


def thread_state(snapshot: Any) -> dict[str, Any]:
    """The SDK's ``ThreadState`` of a LangGraph ``StateSnapshot``."""
    tasks = [{"id": t.id, "name": t.name, "error": None if t.error is None else str(t.error),
              "interrupts": jsonable(list(t.interrupts)), "checkpoint": None, "state": None,
              "result": jsonable(t.result) if getattr(t, "result", None) is not None else None}
             for t in snapshot.tasks]
    return {
        "values": jsonable(snapshot.values),
        "next": list(snapshot.next),
        "checkpoint": checkpoint_ref(snapshot.config),
        "metadata": jsonable(snapshot.metadata or {}),
        "created_at": snapshot.created_at,
        "parent_checkpoint": checkpoint_ref(snapshot.parent_config),
        "tasks": tasks,
        "interrupts": jsonable(list(getattr(snapshot, "interrupts", ()) or ())),
    }


__all__ = ["checkpoint_ref", "dumps", "jsonable", "sse_event", "thread_state", "wire_mode"]
