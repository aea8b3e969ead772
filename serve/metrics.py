"""Serving metrics in Prometheus, through ``ray.util.metrics`` (Ray exports them from every
node's metrics agent next to Serve's own ``ray_serve_*`` series; Prometheus scrapes them the
same way locally and on KubeRay). Names are prefixed ``ray_`` on export and counters get
``_total``: ``rayplane_serve_requests`` is ``ray_rayplane_serve_requests_total`` in Prometheus.

The ingress (every HTTP request it answered):

- ``rayplane_serve_requests`` (counter; model, endpoint, status) and
  ``rayplane_serve_request_errors`` (counter; model, endpoint, code): the ones that failed.

Each model, per registered model version (model monitoring; labels ``model`` -- the served
name --, ``registered_model`` and ``model_version``, see :func:`version_labels`):

- ``rayplane_serve_model_requests`` (counter; + status) and
  ``rayplane_serve_model_request_errors`` (counter; + code): every request that reached the
  model's replica, a stream that failed after it started included (status of its error event);
- ``rayplane_serve_time_to_first_token_seconds``, ``rayplane_serve_inter_token_latency_seconds``,
  ``rayplane_serve_request_latency_seconds`` (histograms);
- ``rayplane_serve_output_tokens`` / ``rayplane_serve_prompt_tokens`` (counters): ``rate()`` of
  the first is the model's output tokens per second; ``rayplane_serve_output_tokens_per_second``
  (histogram) is per request.

Cardinality stays bounded: a replica serves one model version, so each series set is one per
deployed version (old versions' series end when their replicas are replaced); statuses are
HTTP codes and error codes come from the code base, never from the request.
Dashboards and alerts over these: infra/monitoring (docs/monitoring.md).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

_LATENCY = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_ITL = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1]
_TPS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]
#: A source from the MLflow registry: ``models:/NAME/VERSION`` or ``models:/NAME@alias``.
_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
_ERROR_EVENT = 'data: {"error":'
#: The HTTP status an error event's ``type`` stands for (the stream itself answered 200).
_STATUS_OF_TYPE = {"invalid_request_error": 400, "service_unavailable": 503,
                   "upstream_error": 502, "timeout_error": 504, "rate_limit_error": 429}
#: Status of a request whose client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499


def version_labels(source: str | None) -> dict[str, str]:
    """``registered_model`` and ``model_version`` of a model's source: the registry name and
    version (``rayplane serve up`` pins ``@alias`` to the version it points at); an alias
    left unpinned is ``@alias``; a folder, a run or S3 is ``unregistered``."""
    m = _REGISTRY.match(source or "")
    if m is None:
        return {"registered_model": "", "model_version": "unregistered"}
    return {"registered_model": m["name"],
            "model_version": m["version"] or f"@{m['alias']}"}


class IngressMetrics:
    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter(
            "rayplane_serve_requests", description="OpenAI requests answered by the ingress.",
            tag_keys=("model", "endpoint", "status"))
        self.errors = metrics.Counter(
            "rayplane_serve_request_errors", description="OpenAI requests that failed.",
            tag_keys=("model", "endpoint", "code"))

    def record(self, model: str, endpoint: str, status: int, code: str | None = None) -> None:
        self.requests.inc(1, {"model": model, "endpoint": endpoint, "status": str(status)})
        if status >= 400:
            self.errors.inc(1, {"model": model, "endpoint": endpoint,
                                "code": code or str(status)})


class ModelMetrics:
    """The serving layer's observer (serve/serving.py) for one model version, and the
    outcome of every request its replica takes (:meth:`call`, :meth:`stream`)."""

    def __init__(self, model: str, source: str | None = None):
        from ray.util import metrics

        self._tags = {"model": model, **version_labels(source)}
        tags = tuple(self._tags)
        self.requests = metrics.Counter(
            "rayplane_serve_model_requests", tag_keys=(*tags, "status"),
            description="Requests a model version's replica answered, by HTTP status.")
        self.errors = metrics.Counter(
            "rayplane_serve_model_request_errors", tag_keys=(*tags, "code"),
            description="Requests a model version's replica failed, by error code.")
        self.ttft = metrics.Histogram(
            "rayplane_serve_time_to_first_token_seconds", boundaries=_LATENCY,
            description="Time from a request reaching the model to its first token.",
            tag_keys=tags)
        self.itl = metrics.Histogram(
            "rayplane_serve_inter_token_latency_seconds", boundaries=_ITL,
            description="Time between two output tokens of one sequence.", tag_keys=tags)
        self.latency = metrics.Histogram(
            "rayplane_serve_request_latency_seconds", boundaries=_LATENCY,
            description="Time to generate a whole sequence.", tag_keys=tags)
        self.tps = metrics.Histogram(
            "rayplane_serve_output_tokens_per_second", boundaries=_TPS,
            description="Output tokens per second of one sequence.", tag_keys=tags)
        self.output_tokens = metrics.Counter(
            "rayplane_serve_output_tokens", description="Tokens generated.", tag_keys=tags)
        self.prompt_tokens = metrics.Counter(
            "rayplane_serve_prompt_tokens", description="Prompt tokens processed.",
            tag_keys=tags)

    # -- the observer ------------------------------------------------------------------

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds, self._tags)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds, self._tags)

    def finished(self, prompt_tokens: int, completion_tokens: int, seconds: float,
                 first_token_s: float | None) -> None:
        self.latency.observe(seconds, self._tags)
        self.output_tokens.inc(completion_tokens, self._tags)
        self.prompt_tokens.inc(prompt_tokens, self._tags)
        if seconds > 0:
            self.tps.observe(completion_tokens / seconds, self._tags)

    # -- request outcomes --------------------------------------------------------------

    def outcome(self, status: int, code: str | None = None) -> None:
        self.requests.inc(1, {**self._tags, "status": str(status)})
        if status >= 400:
            self.errors.inc(1, {**self._tags, "code": code or str(status)})

    def _failed(self, err: BaseException) -> None:
        if isinstance(err, asyncio.CancelledError | GeneratorExit):
            self.outcome(CLIENT_CLOSED, "client_closed")
        else:  # an EngineError carries its HTTP status and code; anything else is a 500
            self.outcome(int(getattr(err, "status", 500)),
                         getattr(err, "code", None) or "internal_error")

    async def call(self, awaitable: Awaitable[Any]) -> Any:
        """The result of one unary request, its outcome counted."""
        try:
            result = await awaitable
        except BaseException as err:
            self._failed(err)
            raise
        self.outcome(200)
        return result

    async def stream(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """One streamed request's server-sent events, passed through; its outcome is the
        error event it carries (a failure after the stream started), else 200."""
        failure: dict | None = None
        try:
            async for line in lines:
                # A write may hold several events (serve/serving.py); the error event starts
                # one of them (JSON escapes every quote inside a string, so text cannot).
                if failure is None and (line.startswith(_ERROR_EVENT)
                                        or "\n\n" + _ERROR_EVENT in line):
                    failure = _error_of(line)
                yield line
        except BaseException as err:
            self._failed(err)
            raise
        if failure is None:
            self.outcome(200)
        else:
            self.outcome(_STATUS_OF_TYPE.get(failure.get("type"), 500), failure.get("code"))


def _error_of(line: str) -> dict:
    """The ``error`` object of the error event in ``line`` (one or more events)."""
    event = line[line.index(_ERROR_EVENT):].split("\n\n", 1)[0]
    try:
        return json.loads(event[len("data: "):])["error"] or {}
    except (ValueError, KeyError, TypeError):
        return {}


__all__ = ["CLIENT_CLOSED", "IngressMetrics", "ModelMetrics", "version_labels"]
