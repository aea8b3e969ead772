"""Request bodies of the LangGraph server API, as the official ``langgraph-sdk`` client sends
them (langgraph_sdk/_async/{assistants,threads,runs}.py). Fields this server does not act on
(webhooks, crons, TTLs, LangSmith) are accepted and ignored, as LangGraph's own server accepts
any field a newer client sends; a field of the wrong type is a 422."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Stream modes served; ``messages-tuple`` is LangGraph's ``messages`` mode whose events are
#: ``[message, metadata]`` pairs, named ``messages`` on the wire.
StreamMode = Literal["values", "updates", "messages-tuple", "messages"]
MultitaskStrategy = Literal["reject", "enqueue", "interrupt", "rollback"]


#: Most rows a page may ask for, and the largest offset PostgreSQL's ``OFFSET`` takes (bigint).
MAX_OFFSET = 2**63 - 1


def text_problem(value: Any, path: str = "") -> str | None:
    """Where ``value`` holds text PostgreSQL cannot store (a NUL character; a lone surrogate,
    which is not UTF-8), as ``path: what``; None when it has none. Keys count as text."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{path or 'body'}: text must not contain NUL characters (\\u0000)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path or 'body'}: text must be valid Unicode (no lone surrogates)"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            found = text_problem(k, where) or text_problem(v, where)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = text_problem(v, f"{path}[{i}]")
            if found:
                return found
    return None


class _Body(BaseModel):
    """A request body: fields a newer client sends are kept; text PostgreSQL cannot store
    (threads, runs and their metadata live there) is refused, naming the field (422)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        found = text_problem(data)
        if found:
            raise ValueError(found)
        return data


class AssistantSearch(_Body):
    graph_id: str | None = None
    name: str | None = None
    metadata: dict[str, Any] | None = None
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)


class ThreadCreate(_Body):
    thread_id: str | None = None
    metadata: dict[str, Any] | None = None
    if_exists: Literal["raise", "do_nothing"] = "raise"


class ThreadSearch(_Body):
    metadata: dict[str, Any] | None = None
    status: Literal["idle", "busy", "interrupted", "error"] | None = None
    ids: list[str] | None = None
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)


class ThreadPatch(_Body):
    metadata: dict[str, Any] = Field(default_factory=dict)


class StateUpdate(_Body):
    values: dict[str, Any] | list[Any] | None = None
    as_node: str | None = None
    checkpoint_id: str | None = None
    checkpoint: dict[str, Any] | None = None


class Checkpoint(_Body):
    """The SDK's ``Checkpoint``: where in a thread's history."""

    thread_id: str | None = None
    checkpoint_ns: str | None = None
    checkpoint_id: str | None = None
    checkpoint_map: dict[str, Any] | None = None


class History(_Body):
    limit: int = Field(default=10, ge=1, le=1000)
    before: Checkpoint | str | None = None
    metadata: dict[str, Any] | None = None
    checkpoint: Checkpoint | None = None


class Command(_Body):
    """LangGraph's ``Command``: ``resume`` answers an interrupt."""

    resume: Any = None
    update: dict[str, Any] | list[Any] | None = None
    goto: str | list[str] | None = None

    @model_validator(mode="after")
    def _does_something(self) -> Command:
        # A Command that writes nothing makes LangGraph 1.x fail with an UnboundLocalError
        # ('resume_is_map', pregel/_loop.py) instead of its EmptyInputError: a 500.
        if self.resume is None and not self.update and not self.goto:
            raise ValueError("set resume, update or goto (an empty command does nothing)")
        return self


class Configurable(_Body):
    """``config.configurable``: the checkpointer reads these two (the thread is the run's)."""

    checkpoint_id: str | None = None
    checkpoint_ns: str | None = None


class RunConfig(_Body):
    """The run's LangGraph ``config``: what the graph reads of it (others are kept)."""

    tags: list[str] | None = None
    recursion_limit: int | None = Field(default=None, ge=1, le=10_000)
    configurable: Configurable | None = None


class RunCreate(_Body):
    assistant_id: str = Field(min_length=1)
    input: dict[str, Any] | None = None
    command: Command | None = None
    stream_mode: StreamMode | list[StreamMode] = "values"
    config: RunConfig | None = None
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


__all__ = ["MAX_OFFSET", "AssistantSearch", "Checkpoint", "Command", "Configurable", "History",
           "MultitaskStrategy", "RunConfig", "RunCreate", "StateUpdate", "StreamMode",
           "ThreadCreate", "ThreadPatch", "ThreadSearch", "text_problem"]
