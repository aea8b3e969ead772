"""What the CrewAI and AutoGen examples share: the model endpoint from the agents app's spec,
the platform tools wrapped so that every call is recorded, and the one result shape of a run.

Nothing here imports a framework: this module runs in the platform's environment too (the
agents API builds its graph from :data:`RESULT_STATUSES`).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.graphs.model import describe_error, resolve_endpoint
from agents.platform import platform_tools
from agents.spec import AgentsAppConfig
from raycluster.errors import PlatformError

#: How a run ended: answered; step_limit (the framework stopped before an answer); model_error
#: (the model endpoint failed: unreachable, timed out, refused); timeout (the whole run took
#: longer than its bound); error (anything else, the message says what).
RESULT_STATUSES = ("answered", "step_limit", "model_error", "timeout", "error")


@dataclass(frozen=True)
class Endpoint:
    """The OpenAI-compatible endpoint a framework's model calls go to."""

    base_url: str
    api_key: str
    model: str
    timeout_s: float
    max_retries: int


def endpoint(config: AgentsAppConfig) -> Endpoint:
    """The spec's model endpoint, its key from ``api_key_env``, ``api_key_file`` or the
    platform's defaults (OPENAI_API_KEY, RAYPLANE_API_KEY_FILE) -- the tools graph's rule."""
    spec = config.model
    key = None
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise PlatformError(f"model.api_key_env: {spec.api_key_env} is not set on this node")
    base, key = resolve_endpoint(spec.base_url, key, spec.api_key_file)
    return Endpoint(base_url=base, api_key=key, model=spec.model, timeout_s=spec.timeout_s,
                    max_retries=spec.max_retries)


@dataclass
class ToolLog:
    """The tool calls of one run, in order: name, arguments, result (the JSON-able dict the
    platform tool returned) and an id the answer's messages refer to."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def record(self, fn: Callable[..., dict[str, Any]]) -> Callable[..., str]:
        """``fn`` as a framework tool: same name, docstring and parameters; returns the JSON
        text of the result (what LangGraph's ToolNode sends the model), and logs the call."""
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def tool(*args: Any, **kwargs: Any) -> str:
            bound = sig.bind(*args, **kwargs)
            try:
                result = fn(*args, **kwargs)
            except Exception as err:  # a platform tool reports; a foreign one may raise
                result = {"error": str(err).splitlines()[0] if str(err) else
                          type(err).__name__}
            self.calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "name": fn.__name__,
                               "args": dict(bound.arguments), "result": result})
            return json.dumps(result, ensure_ascii=False)

        del tool.__wrapped__  # the framework reads the signature below, not fn's
        tool.__signature__ = sig.replace(return_annotation=str)  # type: ignore[attr-defined]
        tool.__annotations__ = {**fn.__annotations__, "return": str}
        return tool

    def tools(self, names: list[str] | None = None) -> list[Callable[..., str]]:
        """The platform's tools (``agents.platform.platform_tools``, in its order: the list the
        served model was trained with), recorded; only ``names`` when given."""
        chosen = [t for t in platform_tools() if names is None or t.__name__ in names]
        return [self.record(t) for t in chosen]


def result(*, status: str, answer: str | None = None, log: ToolLog | None = None,
           error: str | None = None, framework: str, **extra: Any) -> dict[str, Any]:
    """The answer of a framework deployment's ``run``."""
    assert status in RESULT_STATUSES, status
    return {"framework": framework, "status": status, "answer": answer,
            "tool_calls": list(log.calls) if log else [], "error": error, **extra}


def model_error(err: BaseException, base_url: str) -> str | None:
    """One line naming the endpoint when ``err`` (or an error it was raised from) is the
    OpenAI client's; None for any other error."""
    try:
        import openai
    except ImportError:  # pragma: no cover - both frameworks bring openai
        return None
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, openai.OpenAIError):
            return describe_error(cause, base_url)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


__all__ = ["RESULT_STATUSES", "Endpoint", "ToolLog", "endpoint", "first_line", "model_error",
           "result"]
