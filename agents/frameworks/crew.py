"""The CrewAI example: a crew of one agent, with the platform's calculator and unit
converter, whose one task answers the user's question, on the platform's model.

The model is the spec's OpenAI-compatible endpoint through CrewAI's native OpenAI provider
(``LLM(model="openai/<name>", base_url=...)``). Its tool calls are OpenAI function calls
(CrewAI uses them whenever the model supports function calling, as every OpenAI-compatible
endpoint's model does), not CrewAI's ReAct text format, and the prompt is CrewAI's short native
one: a system message from the agent's role, backstory and goal, and a user message holding
the task (the question) and its expected output.

Runs only in the ``crewai`` deployment's own environment (agents/frameworks/env.py): crewai
is imported inside :func:`run_crew`.
"""

from __future__ import annotations

import time
from typing import Any

from agents.frameworks.common import Endpoint, ToolLog, first_line, model_error, result

ROLE = "Calculator"
GOAL = "Answer the user's question"
BACKSTORY = "You do arithmetic and convert units with your tools."
EXPECTED_OUTPUT = "The answer"
#: The agent's tools (platform tools, in the platform's order). CrewAI's prompt is long
#: already; the crew keeps to arithmetic and units so a small served model can follow it.
TOOLS = ("calculator", "convert_units")


def crew_messages(question: str) -> list[dict[str, str]]:
    """The first request's messages as CrewAI (the pinned version, native tool calling)
    builds them for :func:`build_crew`'s crew: what a model must answer to drive it."""
    return [
        {"role": "system", "content": f"You are {ROLE}. {BACKSTORY}\nYour personal goal is: "
                                      f"{GOAL}"},
        {"role": "user", "content": f"\nCurrent Task: {question}\n\nThis is the expected "
                                    f"criteria for your final answer: {EXPECTED_OUTPUT}\nyou "
                                    "MUST return the actual complete content as the final "
                                    "answer, not a summary."},
    ]


def build_crew(ep: Endpoint, log: ToolLog, *, max_iter: int):
    """The crew: one agent with :data:`TOOLS` (each call recorded in ``log``) and one
    task whose description is the question (``{question}``, given at kickoff)."""
    from crewai import LLM, Agent, Crew, Process, Task
    from crewai.tools import tool

    llm = LLM(model=f"openai/{ep.model}", base_url=ep.base_url, api_key=ep.api_key,
              temperature=0, timeout=ep.timeout_s, max_retries=ep.max_retries)
    tools = [tool(fn.__name__)(fn) for fn in log.tools(list(TOOLS))]
    agent = Agent(role=ROLE, goal=GOAL, backstory=BACKSTORY, tools=tools, llm=llm,
                  max_iter=max_iter, allow_delegation=False, verbose=False, memory=False)
    task = Task(description="{question}", expected_output=EXPECTED_OUTPUT, agent=agent)
    return Crew(agents=[agent], tasks=[task], process=Process.sequential, verbose=False)


def run_crew(question: str, ep: Endpoint, *, max_iter: int) -> dict[str, Any]:
    """Kick the crew off on ``question``; the result of :func:`common.result` (never raises)."""
    log = ToolLog()
    started = time.monotonic()
    try:
        crew = build_crew(ep, log, max_iter=max_iter)
        out = crew.kickoff(inputs={"question": question})
    except Exception as err:  # reported as the run's status, never a hang or a 500
        where = model_error(err, ep.base_url)
        return result(framework="crewai", status="model_error" if where else "error",
                      error=where or first_line(err), log=log,
                      elapsed_s=round(time.monotonic() - started, 3))
    answer = (out.raw or "").strip()
    # CrewAI ends a run that reached max_iter with a forced answer; no tool call after the
    # last one and an empty answer both mean it did not get there.
    status = "answered" if answer else "step_limit"
    return result(framework="crewai", status=status, answer=answer or None, log=log,
                  elapsed_s=round(time.monotonic() - started, 3))


__all__ = ["BACKSTORY", "EXPECTED_OUTPUT", "GOAL", "ROLE", "TOOLS", "build_crew",
           "crew_messages", "run_crew"]
