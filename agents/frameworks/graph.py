"""A framework deployment as a LangGraph graph, so the agents API serves the CrewAI crew and
the AutoGen team as assistants (``crewai``, ``autogen``) like its own graphs: same threads,
auth, errors, streaming and traces.

The graph has one node: it sends the thread's last user message to the deployment's handle
and appends what the framework did, in LangGraph's own message types: per tool call, the
model's ``AIMessage`` with the call and the ``ToolMessage`` with its result, then the answer.
A model endpoint that failed (or a run past its bound) raises ``ModelEndpointError`` (the API's
502 naming the endpoint), any other framework failure a ``PlatformError`` with its message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from agents.frameworks.common import first_line
from agents.frameworks.deployment import run_timeout_s
from agents.frameworks.env import KINDS
from agents.graphs.model import ModelEndpointError
from agents.spec import AgentsAppConfig
from raycluster.errors import PlatformError

#: Beyond the run's own bound: the handle's queueing and the reply's way back.
HANDLE_SLACK_S = 30.0


class FrameworkState(TypedDict, total=False):
    """The chat and how the framework's last run ended (``RESULT_STATUSES``)."""

    messages: Annotated[list[AnyMessage], add_messages]
    status: str


def question_of(messages: list[AnyMessage]) -> str | None:
    """The text of the last user message (None when the thread's last message is not one)."""
    if not messages or not isinstance(messages[-1], HumanMessage):
        return None
    content = messages[-1].content
    if isinstance(content, list):  # content blocks: the text parts
        content = "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return content.strip() or None


def messages_of(kind: str, out: dict[str, Any]) -> list[AnyMessage]:
    """The framework's run as LangGraph messages: its tool calls and results, then the answer
    (or, stopped at the step limit, a message saying so)."""
    messages: list[AnyMessage] = []
    for call in out.get("tool_calls") or []:
        messages.append(AIMessage(content="", name=kind, tool_calls=[
            {"name": call["name"], "args": call["args"], "id": call["id"]}]))
        failed = isinstance(call["result"], dict) and "error" in call["result"]
        messages.append(ToolMessage(content=json.dumps(call["result"], ensure_ascii=False),
                                    tool_call_id=call["id"], name=call["name"],
                                    status="error" if failed else "success"))
    answer = out.get("answer") or (f"The {kind} run stopped at its step limit before an "
                                   "answer.")
    messages.append(AIMessage(content=answer, name=kind,
                              response_metadata={"framework": kind, "status": out["status"]}))
    return messages


def _update(kind: str, out: dict[str, Any]) -> dict[str, Any]:
    status = out.get("status")
    if status in ("model_error", "timeout"):
        raise ModelEndpointError(out.get("error") or f"the {kind} run's model call failed")
    if status not in ("answered", "step_limit"):
        raise PlatformError(f"{kind}: {out.get('error') or 'the run failed'}")
    return {"messages": messages_of(kind, out), "status": status}


def _no_question(kind: str) -> dict[str, Any]:
    return {"messages": [AIMessage(content="There is no question to answer: the thread's last "
                                           "message must be the user's.", name=kind)],
            "status": "error"}


def framework_graph(kind: str, config: AgentsAppConfig, handle: Any, *,
                    checkpointer: Any = None):
    """The compiled graph of framework ``kind`` over ``handle`` (the deployment of
    :func:`agents.frameworks.framework_deployment`). Without ``checkpointer`` the agents API
    gives it its own."""
    if kind not in KINDS:
        raise PlatformError(f"unknown framework {kind!r}; frameworks: {', '.join(KINDS)}")
    if handle is None:
        raise PlatformError(f"graph {kind!r} needs its framework deployment's handle")
    bound = run_timeout_s(config) + HANDLE_SLACK_S

    def failed(err: BaseException) -> PlatformError:
        if isinstance(err, TimeoutError):
            return PlatformError(f"the {kind} deployment did not answer in {bound:.0f}s")
        return PlatformError(f"the {kind} deployment failed: {first_line(err)}")

    def ask(state: FrameworkState) -> dict[str, Any]:
        question = question_of(state.get("messages") or [])
        if question is None:
            return _no_question(kind)
        try:
            out = handle.run.remote(question).result(timeout_s=bound)
        except Exception as err:  # unavailable, crashed or late: one line, never a hang
            raise failed(err) from err
        return _update(kind, out)

    async def aask(state: FrameworkState) -> dict[str, Any]:
        question = question_of(state.get("messages") or [])
        if question is None:
            return _no_question(kind)
        try:
            out = await asyncio.wait_for(handle.run.remote(question), bound)
        except Exception as err:  # unavailable, crashed or late: one line, never a hang
            raise failed(err) from err
        return _update(kind, out)

    graph = StateGraph(FrameworkState)
    graph.add_node(kind, RunnableLambda(ask, afunc=aask, name=kind))
    graph.add_edge(START, kind)
    graph.add_edge(kind, END)
    return graph.compile(checkpointer=checkpointer, name=kind)


__all__ = ["FrameworkState", "framework_graph", "messages_of", "question_of"]
