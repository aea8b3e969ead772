"""Agent run metrics in Prometheus, through ``ray.util.metrics`` (exported by every node's
Ray metrics agent with the ``ray_`` prefix, counters with ``_total``, beside Serve's own
``ray_serve_*`` series of the agents app):

- ``rayplane_agents_runs`` (counter; graph, status): every run that ended, by the status it
  recorded (``success``, ``error``, ``interrupted``);
- ``rayplane_agents_run_errors`` (counter; graph, code): the failed ones, by the error code
  their body carries (``model_endpoint_error``, ``database_unavailable``, ...);
- ``rayplane_agents_run_duration_seconds`` (histogram; graph, status).

Labels are bounded: graphs are the app's hosted graphs, statuses and codes come from the code.
The agents dashboard and the AgentRunFailures alert read them (infra/monitoring,
docs/monitoring.md).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_DURATION = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class RunMetrics:
    def __init__(self):
        from ray.util import metrics

        self.runs = metrics.Counter(
            "rayplane_agents_runs", description="Agent runs that ended, by status.",
            tag_keys=("graph", "status"))
        self.errors = metrics.Counter(
            "rayplane_agents_run_errors", description="Agent runs that failed, by error code.",
            tag_keys=("graph", "code"))
        self.duration = metrics.Histogram(
            "rayplane_agents_run_duration_seconds", boundaries=_DURATION,
            description="Time from a run's start to its end.", tag_keys=("graph", "status"))

    def finished(self, graph: str, status: str, seconds: float,
                 code: str | None = None) -> None:
        """Count one run that ended; never raises (a metric must not fail a run)."""
        try:
            self.runs.inc(1, {"graph": graph, "status": status})
            self.duration.observe(max(0.0, seconds), {"graph": graph, "status": status})
            if status == "error":
                self.errors.inc(1, {"graph": graph, "code": code or "internal_error"})
        except Exception as err:  # noqa: BLE001 - reported, the run goes on
            log.warning("agent run metrics: %s", err)


__all__ = ["RunMetrics"]
