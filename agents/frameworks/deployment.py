"""The Serve deployment that hosts a framework example (the CrewAI crew or the AutoGen team)
in its own environment, and its options from the agents app's spec.

A replica's interpreter is the framework's layered environment (``agents.frameworks.env``),
so crewai/autogen import there and nowhere else; its ``run(question)`` answers with the
framework's result (:func:`agents.frameworks.common.result`) and never raises: a model
endpoint that is down, a tool that fails or a run past its bound comes back as a status and
a one-line message, within :func:`run_timeout_s`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import sys
from typing import Any

from ray import serve

from agents.frameworks.common import endpoint, first_line, result
from agents.frameworks.env import KINDS, env_dir, install_seconds, runtime_env
from agents.serve_app import replica_options
from agents.spec import AgentsAppConfig
from raycluster.errors import PlatformError

#: Serve deployment names, as the dashboard and `serve status` show them.
DEPLOYMENT_NAMES = {"crewai": "CrewAI", "autogen": "AutoGen"}
#: The distribution each framework's version is read from (``info``).
DISTRIBUTIONS = {"crewai": ("crewai",), "autogen": ("autogen-agentchat", "autogen-ext")}


def run_timeout_s(config: AgentsAppConfig) -> float:
    """The most a run may take: one model call per step and the final answer, each bounded
    by the endpoint's timeout."""
    return config.model.timeout_s * (config.step_limit + 1)


def _module(kind: str):
    if kind == "crewai":
        from agents.frameworks import crew

        return crew
    from agents.frameworks import team

    return team


@serve.deployment(name="FrameworkAgent", max_ongoing_requests=16)
class FrameworkAgent:
    """One replica of a framework example; ``kind`` is crewai or autogen."""

    def __init__(self, kind: str, config: dict[str, Any]):
        if kind not in KINDS:
            raise PlatformError(f"unknown framework {kind!r}; frameworks: {', '.join(KINDS)}")
        self.kind = kind
        self.config = AgentsAppConfig.model_validate(config)
        self.module = _module(kind)
        # Import the framework now: a replica whose environment lacks it fails to start
        # with the reason, instead of failing every run; and the first run is not slowed.
        __import__("crewai" if kind == "crewai" else "autogen_agentchat")

    async def run(self, question: str) -> dict[str, Any]:
        """The framework's answer to ``question`` with the tool calls it made and a status
        (see ``agents.frameworks.common.RESULT_STATUSES``)."""
        if not isinstance(question, str) or not question.strip():
            return result(framework=self.kind, status="error",
                          error="question: give the user's question as a non-empty string")
        try:
            ep = endpoint(self.config)
        except PlatformError as err:
            return result(framework=self.kind, status="model_error", error=str(err))
        steps = self.config.step_limit
        if self.kind == "crewai":  # synchronous: in a thread, so the replica keeps serving
            work = asyncio.to_thread(self.module.run_crew, question, ep, max_iter=steps)
        else:
            work = self.module.run_team(question, ep, max_tool_iterations=steps)
        bound = run_timeout_s(self.config)
        try:
            return await asyncio.wait_for(work, bound)
        except TimeoutError:
            return result(framework=self.kind, status="timeout",
                          error=f"the {self.kind} run did not finish in {bound:.0f}s (model "
                                f"endpoint {ep.base_url}, {ep.timeout_s:.0f}s per call)")
        except Exception as err:  # the modules report their own errors; this is a last net
            return result(framework=self.kind, status="error", error=first_line(err))

    def info(self) -> dict[str, Any]:
        """Where the replica runs: its interpreter, the framework's versions, its environment
        and how long that took to build on this node."""
        versions = {}
        for dist in DISTRIBUTIONS[self.kind]:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        return {"framework": self.kind, "python": sys.executable, "versions": versions,
                "env_dir": str(env_dir(self.kind)),
                "install_seconds": install_seconds(self.kind)}


def deployment_options(kind: str, config: AgentsAppConfig) -> dict[str, Any]:
    """The deployment's Serve options: its name, pool, runtime_env (the framework's own
    environment), concurrency and autoscaling from the spec."""
    if kind not in KINDS:
        raise PlatformError(f"unknown framework {kind!r}; frameworks: {', '.join(KINDS)}")
    return {"name": DEPLOYMENT_NAMES[kind],
            "ray_actor_options": {**replica_options(config), "runtime_env": runtime_env(kind)},
            "max_ongoing_requests": config.max_ongoing_requests,
            "autoscaling_config": config.autoscaling.serve_options()}


def framework_deployment(kind: str, config: AgentsAppConfig):
    """The bound Serve deployment of framework ``kind`` for the agents app ``config``; its
    handle's ``run.remote(question)`` answers (``agents.frameworks.framework_graph`` wraps
    it as an assistant of the agents API)."""
    return FrameworkAgent.options(**deployment_options(kind, config)).bind(
        kind, config.model_dump(mode="json"))


__all__ = ["DEPLOYMENT_NAMES", "FrameworkAgent", "deployment_options",
           "framework_deployment", "run_timeout_s"]
