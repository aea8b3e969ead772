"""MLflow traces of agent graph runs, with MLflow's own LangChain/LangGraph tracing.

    enable_tracing("http://127.0.0.1:5000")          # once per process (a Serve replica too)
    graph.invoke(inputs, run_config("thread-1"))      # one trace per run, in the MLflow UI

``enable_tracing`` points MLflow at the platform's tracking server, selects (creating it if
needed) the experiment the traces go to and turns on ``mlflow.langchain.autolog``: every run
of a LangChain runnable or LangGraph graph in the process becomes one MLflow trace, with a span
per graph node, chat model call (``ChatOpenAI``, its messages, tool calls and token usage) and
tool call (its arguments and result). The trace's session (``mlflow.trace.session``, the
"Session" the MLflow UI groups traces by) is the run's LangGraph ``thread_id``: MLflow's tracer
copies it from the run's metadata, which ``run_config`` fills.

Both the tracking URI and autologging are process-global in MLflow, so ``enable_tracing`` is
too: calling it again with the same arguments does nothing, with others it re-points the
process. Tracing is best effort: traces are exported in the background (MLflow's async trace
logging), so an MLflow server that is down or slow never fails nor holds up a graph run; if it
is down when tracing is enabled, tracing stays off (one warning) and a later call retries.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.request
from typing import Any

import mlflow

DEFAULT_EXPERIMENT = "rayplane-agents"
#: How long ``enable_tracing`` waits for the tracking server before giving up.
PROBE_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)
_lock = threading.Lock()
_enabled: tuple[str, str] | None = None
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _probe(tracking_uri: str) -> None:
    """Raise if an HTTP tracking server does not answer its health check within the probe
    timeout (MLflow's own client would retry for minutes first). Other stores are local."""
    if tracking_uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health",
                                    timeout=PROBE_TIMEOUT_S) as reply:
            reply.read()


def enable_tracing(tracking_uri: str | None = None,
                   experiment: str = DEFAULT_EXPERIMENT) -> bool:
    """Trace every graph run of this process to ``experiment`` on ``tracking_uri`` (default:
    ``MLFLOW_TRACKING_URI``, which ``rayplane env`` exports). Idempotent and thread-safe.
    Returns whether tracing is on; never raises for an unreachable server (it warns once)."""
    global _enabled
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        _warn_once("agent traces are off: no MLflow tracking URI (set MLFLOW_TRACKING_URI)")
        return False
    with _lock:
        if _enabled == (uri, experiment):
            return True
        try:
            _probe(uri)
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment)
            mlflow.langchain.autolog(log_traces=True, silent=True)
        except Exception as err:  # noqa: BLE001 - tracing must never break a run
            _warn_once(f"agent traces are off: MLflow at {uri} is not usable "
                       f"({type(err).__name__}: {err})")
            return False
        _enabled = (uri, experiment)
        return True


def disable_tracing() -> None:
    """Stop tracing graph runs in this process (MLflow's LangChain autologging off)."""
    global _enabled
    with _lock:
        mlflow.langchain.autolog(disable=True, silent=True)
        _enabled = None


def tracing_enabled() -> bool:
    """Whether ``enable_tracing`` turned tracing on in this process."""
    return _enabled is not None


def run_config(thread_id: str, **extra: Any) -> dict[str, Any]:
    """The LangGraph ``config`` of a run on thread ``thread_id``: the checkpointer's
    ``configurable.thread_id`` and the run metadata MLflow records as the trace's session.
    ``extra`` are further config keys (``recursion_limit``, ``tags``, ``metadata``,
    ``configurable``), merged in."""
    config = dict(extra)
    config["configurable"] = {**extra.get("configurable", {}), "thread_id": thread_id}
    config["metadata"] = {**extra.get("metadata", {}), "thread_id": thread_id}
    return config


__all__ = ["DEFAULT_EXPERIMENT", "disable_tracing", "enable_tracing", "run_config",
           "tracing_enabled"]
