"""The AutoGen example: an AgentChat team of one ``AssistantAgent`` with the platform's tools,
on the platform's model, that ends when the assistant answers in text.

AutoGen is in maintenance mode upstream: Microsoft keeps it working but builds new features in
its successor, Microsoft Agent Framework. The example is kept working on the pinned
AgentChat 0.7 (agents/frameworks/autogen-requirements.txt); new agents are better written as
LangGraph graphs (the ``tools`` graph) or with Agent Framework.

The model client is autogen-ext's ``OpenAIChatCompletionClient`` pointed at the spec's
endpoint, with ``model_info`` declaring a function-calling model (AutoGen cannot look up a
model name it does not know). The assistant has no system message (the served model's own
prompt is the user's question and the tools' list) and reflects on tool use: after a tool
runs, the model is called again with the result and answers in text.

Runs only in the ``autogen`` deployment's own environment (agents/frameworks/env.py): autogen
is imported inside :func:`run_team`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from agents.frameworks.common import Endpoint, ToolLog, first_line, model_error, result

AGENT_NAME = "assistant"
#: What AutoGen needs to know of a model it cannot look up: it calls functions.
MODEL_INFO = {"vision": False, "function_calling": True, "json_output": False,
              "structured_output": False, "family": "unknown",
              "multiple_system_messages": False}


def described(tool: Callable[..., Any]) -> Callable[..., Any]:
    """``tool`` with each ``Annotated[T, Field(description=...)]`` parameter turned into the
    ``Annotated[T, "description"]`` that AutoGen's FunctionTool reads (it rejects pydantic's
    FieldInfo there)."""
    hints = get_type_hints(tool, include_extras=True)
    for name, hint in hints.items():
        if get_origin(hint) is Annotated:
            base, *meta = get_args(hint)
            text = next((m for m in meta if isinstance(m, str)), None) or next(
                (getattr(m, "description", None) for m in meta
                 if getattr(m, "description", None)), None)
            hints[name] = Annotated[base, text] if text else base
    tool.__annotations__ = hints
    return tool


def build_team(ep: Endpoint, log: ToolLog, *, max_tool_iterations: int):
    """The team and its model client (close it after the run)."""
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.conditions import MaxMessageTermination, TextMessageTermination
    from autogen_agentchat.teams import RoundRobinGroupChat
    from autogen_core.tools import FunctionTool
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    client = OpenAIChatCompletionClient(
        model=ep.model, base_url=ep.base_url, api_key=ep.api_key, model_info=MODEL_INFO,
        temperature=0, timeout=ep.timeout_s, max_retries=ep.max_retries)
    tools = [FunctionTool(described(fn), description=fn.__doc__ or fn.__name__,
                          name=fn.__name__) for fn in log.tools()]
    assistant = AssistantAgent(AGENT_NAME, model_client=client, tools=tools,
                               system_message=None, reflect_on_tool_use=True,
                               max_tool_iterations=max_tool_iterations)
    # The assistant's text is the answer; the message cap bounds a team that never gets one
    # (the task, then per step a tool request and its results, then the text).
    stop = TextMessageTermination(AGENT_NAME) | MaxMessageTermination(
        2 + 2 * max_tool_iterations)
    return RoundRobinGroupChat([assistant], termination_condition=stop), client


def _relayed_model_error(err: BaseException, base_url: str) -> str | None:
    """The team runs its agents in background tasks and re-raises their errors as
    ``RuntimeError("<OpenAI error class>: <message>")``, without the original: read it back."""
    import openai

    name, _, message = str(err).partition(": ")
    cls = getattr(openai, name, None)
    if not (isinstance(cls, type) and issubclass(cls, openai.OpenAIError)):
        return None
    where = f"model endpoint {base_url}"
    if issubclass(cls, openai.APITimeoutError):
        return f"{where} did not answer in time (request timed out)"
    if issubclass(cls, openai.APIConnectionError):
        return f"{where} is unreachable ({message.splitlines()[0] if message else name})"
    return f"{where} failed: {name}: {message.splitlines()[0] if message else ''}".rstrip(": ")


async def run_team(question: str, ep: Endpoint, *, max_tool_iterations: int) -> dict[str, Any]:
    """Run the team on ``question``; the result of :func:`common.result` (never raises)."""
    from autogen_agentchat.messages import TextMessage

    log = ToolLog()
    started = time.monotonic()
    client = None
    try:
        team, client = build_team(ep, log, max_tool_iterations=max_tool_iterations)
        out = await team.run(task=question)
    except Exception as err:  # reported as the run's status, never a hang or a 500
        where = model_error(err, ep.base_url) or _relayed_model_error(err, ep.base_url)
        return result(framework="autogen", status="model_error" if where else "error",
                      error=where or first_line(err), log=log,
                      elapsed_s=round(time.monotonic() - started, 3))
    finally:
        if client is not None:
            await client.close()
    answers = [m.content for m in out.messages
               if isinstance(m, TextMessage) and m.source == AGENT_NAME]
    answer = answers[-1].strip() if answers else ""
    return result(framework="autogen", status="answered" if answer else "step_limit",
                  answer=answer or None, log=log, stop_reason=out.stop_reason,
                  elapsed_s=round(time.monotonic() - started, 3))


__all__ = ["AGENT_NAME", "MODEL_INFO", "build_team", "described", "run_team"]
