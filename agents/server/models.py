"""Request bodies of the LangGraph server API, as the official ``langgraph-sdk`` client sends
them (langgraph_sdk/_async/{assistants,threads,runs}.py). Fields this server does not act on
(webhooks, crons, TTLs, LangSmith) are accepted and ignored, as LangGraph's own server accepts
any field a newer client sends; a field of the wrong type is a 422."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Stream modes served; ``messages-tuple`` is LangGraph's ``messages`` mode whose events are
#: ``[message, metadata]`` pairs, named ``messages`` on the wire.
StreamMode = Literal["values", "updates", "messages-tuple", "messages"]
MultitaskStrategy = Literal["reject", "enqueue", "interrupt", "rollback"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class AssistantSearch(_Body):
    graph_id: str | None = None
    name: str | None = None
    metadata: dict[str, Any] | None = None
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)


class ThreadCreate(_Body):
    thread_id: str | None = None
    metadata: dict[str, Any] | None = None
    if_exists: Literal["raise", "do_nothing"] = "raise"


class ThreadSearch(_Body):
    metadata: dict[str, Any] | None = None
    status: Literal["idle", "busy", "interrupted", "error"] | None = None
    ids: list[str] | None = None
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)


class ThreadPatch(_Body):
    metadata: dict[str, Any] = Field(default_factory=dict)


class StateUpdate(_Body):
    values: dict[str, Any] | list[Any] | None = None
    as_node: str | None = None
    checkpoint_id: str | None = None
    checkpoint: dict[str, Any] | None = None


class History(_Body):
    limit: int = Field(default=10, ge=1, le=1000)
    before: dict[str, Any] | str | None = None
    metadata: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None


class Command(_Body):
    """LangGraph's ``Command``: ``resume`` answers an interrupt."""

    resume: Any = None
    update: dict[str, Any] | list[Any] | None = None
    goto: str | list[str] | None = None


class RunCreate(_Body):
    assistant_id: str = Field(min_length=1)
    input: dict[str, Any] | None = None
    command: Command | None = None
    stream_mode: StreamMode | list[StreamMode] = "values"
    config: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    multitask_strategy: MultitaskStrategy = "reject"
    if_not_exists: Literal["create", "reject"] = "reject"
    interrupt_before: Literal["*"] | list[str] | None = None
    interrupt_after: Literal["*"] | list[str] | None = None
    checkpoint_id: str | None = None

    def modes(self) -> list[str]:
        """The stream modes asked for, without repeats, in the client's order."""
        asked = [self.stream_mode] if isinstance(self.stream_mode, str) else self.stream_mode
        return list(dict.fromkeys(asked or ["values"]))


__all__ = ["AssistantSearch", "Command", "History", "MultitaskStrategy", "RunCreate",
           "StateUpdate", "StreamMode", "ThreadCreate", "ThreadPatch", "ThreadSearch"]
