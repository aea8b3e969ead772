"""CrewAI and AutoGen on the platform: a CrewAI crew and an AutoGen AgentChat team, each a
Serve deployment in its own Python environment (their dependencies cannot live beside the
platform's: see ``agents.frameworks.env``), and each wrapped as a LangGraph graph so the
agents API serves them as the assistants ``crewai`` and ``autogen``.

Importing this package never imports crewai or autogen: only the deployments' replicas do.
AutoGen is in maintenance mode upstream (its successor is Microsoft Agent Framework); see
``agents.frameworks.team``.
"""

from agents.frameworks.common import RESULT_STATUSES
from agents.frameworks.deployment import (
    DEPLOYMENT_NAMES,
    FrameworkAgent,
    deployment_options,
    framework_deployment,
    run_timeout_s,
)
from agents.frameworks.env import KINDS, requirements, runtime_env
from agents.frameworks.graph import framework_graph

__all__ = ["DEPLOYMENT_NAMES", "KINDS", "RESULT_STATUSES", "FrameworkAgent",
           "deployment_options", "framework_deployment", "framework_graph", "requirements",
           "runtime_env", "run_timeout_s"]
