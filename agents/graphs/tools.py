"""The ``tools`` graph: the model answers a question, calling tools as often as it needs.

    START -> model -(tool calls?)-> tools -> model -> ... -(answer)-> END

LangGraph's prebuilt pieces do the standard parts: ``tools_condition`` decides whether the
model asked for tools, ``ToolNode`` runs them (in parallel when the model asks for several)
and reports a tool that raises to the model as an error ``ToolMessage`` instead of failing the
run. The model is bound with the tools' OpenAI definitions; a tool the platform's model was
trained on (train.tools: calculator, convert_units, pool_info) is declared with exactly the
definition it was trained with, so the served model sees the prompt it learnt.

The step limit bounds the model calls for one question: a model still asking for tools on
its last allowed call is stopped there, with its calls answered as not run (the thread stays
a valid chat), a final ``AIMessage`` saying so and ``status: "step_limit"``, never a
``GraphRecursionError``. A run also stops this way when LangGraph's own recursion limit
(``config["recursion_limit"]``) would end it first.

A tool that raises is answered to the model as ``{"error": ...}`` and, by the graph's
``tool_errors`` policy, the model goes on (``continue``: it may retry or explain) or the run
ends there (``stop``: a final message names the tool and ``status: "tool_error"``). A tool
that returns ``{"error": ...}`` itself (the platform tools do, for an unknown pool) answered
normally and is not a raise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.managed import RemainingSteps
from langgraph.prebuilt import ToolNode, tools_condition

from agents.graphs.model import ainvoke_model, endpoint_of, invoke_model
from train import tools as trained

DEFAULT_STEP_LIMIT = 8
#: Statuses of a run: the model is still working, it answered, or it was stopped.
Status = Literal["running", "answered", "step_limit", "tool_error"]
ToolErrors = Literal["continue", "stop"]


class ToolsState(MessagesState):
    """The chat, the run's status and LangGraph's count of the steps left."""

    status: Status
    remaining_steps: RemainingSteps


def as_tool(tool: BaseTool | Callable[..., Any]) -> BaseTool:
    """A LangChain tool: given ones as they are; a plain function by its name and docstring,
    or, for a tool the platform's model was trained on, with its trained OpenAI definition."""
    if isinstance(tool, BaseTool):
        return tool
    name = getattr(tool, "__name__", None)
    if not callable(tool) or not name:
        raise TypeError(f"a tool must be a LangChain tool or a named function, not {tool!r}")
    if name in trained.TOOL_NAMES:
        spec = trained.TOOLS[trained.TOOL_NAMES.index(name)]["function"]
        return StructuredTool.from_function(tool, name=name, description=spec["description"],
                                            args_schema=spec["parameters"])
    return StructuredTool.from_function(tool, name=name)


def tool_error(err: Exception) -> str:
    """The ToolMessage a raising tool answers with: ``{"error": ...}``, the shape of the
    trained tools' own errors (train.tools)."""
    return json.dumps({"error": f"{type(err).__name__}: {err}"}, ensure_ascii=False)


def model_calls(messages: Sequence[Any]) -> int:
    """Model replies since the last user message: the calls spent on the current question."""
    n = 0
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            break
        if isinstance(message, AIMessage):
            n += 1
    return n


def failed_tools(messages: Sequence[Any]) -> list[ToolMessage]:
    """The error ToolMessages of the last tools step (a tool that raised)."""
    out = []
    for message in reversed(messages):
        if not isinstance(message, ToolMessage):
            break
        if message.status == "error":
            out.append(message)
    return out[::-1]


def build_tools_graph(model: Any, tools: Sequence[BaseTool | Callable[..., Any]], *,
                      step_limit: int = DEFAULT_STEP_LIMIT, system_prompt: str | None = None,
                      checkpointer: Any = None, tool_errors: ToolErrors = "continue"):
    """The compiled graph. ``model`` is a LangChain chat model (``chat_model(...)``);
    ``tools`` are LangChain tools or plain functions returning JSON-able values;
    ``step_limit`` is the most model calls for one question; ``system_prompt``, when given,
    is sent first on every call (not stored in the state); ``checkpointer`` keeps threads;
    ``tool_errors`` says whether a raising tool ends the run (``stop``) or not.

    Invoke with ``{"messages": [("user", "What is 12*7?")]}``; the result holds the chat
    (the last message is the answer) and ``status``."""
    if step_limit < 1:
        raise ValueError(f"step_limit must be at least 1, not {step_limit}")
    if tool_errors not in ("continue", "stop"):
        raise ValueError(f"tool_errors must be 'continue' or 'stop', not {tool_errors!r}")
    lc_tools = [as_tool(t) for t in tools]
    names = [t.name for t in lc_tools]
    if not names:
        raise ValueError("a tools graph needs at least one tool")
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique: {names}")
    bound = model.bind_tools(lc_tools)
    endpoint = endpoint_of(model)

    def prompt(state: ToolsState) -> list:
        messages = list(state["messages"])
        return [SystemMessage(system_prompt), *messages] if system_prompt else messages

    def after(state: ToolsState, reply: Any) -> dict[str, Any]:
        if not getattr(reply, "tool_calls", None):
            return {"messages": [reply], "status": "answered"}
        calls = model_calls(state["messages"]) + 1
        # Running the tools and calling the model again takes two more of LangGraph's steps.
        if calls < step_limit and state["remaining_steps"] > 2:
            return {"messages": [reply], "status": "running"}
        why = (f"the step limit of {step_limit} model calls" if calls >= step_limit
               else "the run's recursion limit")
        not_run = [ToolMessage(json.dumps({"error": f"not run: {why} was reached"}),
                               tool_call_id=call["id"], name=call["name"], status="error")
                   for call in reply.tool_calls]
        final = AIMessage(f"Stopped after {calls} model call{'s' if calls > 1 else ''}: {why} "
                          "was reached before the model gave an answer.")
        return {"messages": [reply, *not_run, final], "status": "step_limit"}

    def call_model(state: ToolsState) -> dict[str, Any]:
        return after(state, invoke_model(bound, prompt(state), base_url=endpoint))

    async def acall_model(state: ToolsState) -> dict[str, Any]:
        return after(state, await ainvoke_model(bound, prompt(state), base_url=endpoint))

    def after_tools(state: ToolsState) -> str:
        return "stop" if failed_tools(state["messages"]) else "model"

    def stop(state: ToolsState) -> dict[str, Any]:
        failed = failed_tools(state["messages"])
        names = ", ".join(m.name or "a tool" for m in failed)
        detail = failed[0].content if failed else ""
        return {"messages": [AIMessage(f"Stopped: {names} failed ({detail}); the run's tool "
                                       "error policy is stop.")], "status": "tool_error"}

    graph = StateGraph(ToolsState)
    graph.add_node("model", RunnableLambda(call_model, afunc=acall_model, name="model"))
    graph.add_node("tools", ToolNode(lc_tools, handle_tool_errors=tool_error))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, ["tools", END])
    if tool_errors == "stop":
        graph.add_node("stop", stop)
        graph.add_conditional_edges("tools", after_tools, ["model", "stop"])
        graph.add_edge("stop", END)
    else:
        graph.add_edge("tools", "model")
    # Room for every allowed model call and its tools, so the step limit, not LangGraph's
    # default recursion limit (25), ends a long run.
    return graph.compile(checkpointer=checkpointer, name="tools").with_config(
        recursion_limit=2 * step_limit + 4)


__all__ = ["DEFAULT_STEP_LIMIT", "ToolErrors", "ToolsState", "as_tool", "build_tools_graph",
           "failed_tools", "model_calls", "tool_error"]
