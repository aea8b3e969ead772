"""``rayplane status``'s ``upstream:<model>`` parts: each ``openai-upstream`` model's server
outside Ray, as its proxy replica last saw it (a request's outcome or its probe,
serve/engines/upstream.py), read from the application's ``<route>/healthz`` -- the same
network path and key the requests take; ``/healthz`` needs no key.

A down upstream is a down part (``rayplane status`` exits 1 naming it) while the Serve
application itself stays up: its proxy replica is healthy and answers 502/503 naming the
upstream.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

#: The statuses and probe timeout of raycluster/local/health.py (which imports this module:
#: a part is returned as the keyword arguments of its ``Part``).
UP, DEGRADED, DOWN = "up", "degraded", "down"
PROBE_TIMEOUT = 2.0
#: rayplane's OpenAI app (``serve.builder.APP_BUILDERS``), whose ``args["models"]`` name each
#: model's engine; an ``openai-upstream`` one reports its upstream in ``/healthz``.
SERVE_APP_IMPORT = "serve.app:build_app"
UPSTREAM_ENGINE = "openai-upstream"


def upstream_models(app: dict) -> list[dict]:
    """The ``openai-upstream`` models of one application of Ray's serve details (its
    deployed config's ``args``)."""
    config = app.get("deployed_app_config") or {}
    if config.get("import_path") != SERVE_APP_IMPORT:
        return []
    models = (config.get("args") or {}).get("models") or []
    return [m for m in models if isinstance(m, dict) and m.get("engine") == UPSTREAM_ENGINE]


def _shown(url: str) -> str:
    """A URL without user info, query or fragment (what a report may show)."""
    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


def _why(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return (" ".join(str(err).split()) or type(err).__name__)[:300]


def _part(name: str, status: str, reason: str, url: str, details: dict | None = None) -> dict:
    return {"name": name, "status": status, "reason": reason, "url": url,
            "details": details or {}}


def assess_upstreams(models: list[dict], healthz: dict | BaseException, url: str
                     ) -> list[dict]:
    """One part per ``openai-upstream`` model from the app's ``/healthz`` report (``healthz``:
    its JSON, or why it did not answer): the upstream's status as its replica last saw it;
    unknown (the replica did not report) is degraded."""
    parts = []
    for m in models:
        name = f"upstream:{m.get('name')}"
        where = _shown(str((m.get("upstream") or {}).get("base_url") or "?"))
        if isinstance(healthz, BaseException):
            parts.append(_part(name, DEGRADED, f"{where}: unknown, the app's /healthz did not "
                               f"answer ({_why(healthz)})", url))
            continue
        entry = (healthz.get("models") or {}).get(m.get("name"))
        up = entry.get("upstream") if isinstance(entry, dict) else None
        if not isinstance(up, dict):
            said = entry.get("error") if isinstance(entry, dict) else None
            parts.append(_part(name, DEGRADED, f"{where}: unknown, its replica did not report"
                               + (f" ({said})" if said else ""), url))
            continue
        status = {"up": UP, "down": DOWN}.get(up.get("status"), DEGRADED)
        reason = f"{up.get('url') or where} ({up.get('model')}): {up.get('reason')}"
        since = up.get("since")
        if status != UP and isinstance(since, int | float):
            reason += time.strftime(" (since %H:%M:%S)", time.localtime(since))
        details = {k: entry.get(k) for k in ("requests", "failures", "retries", "running")
                   if k in entry}
        parts.append(_part(name, status, reason, url, {**details, "upstream_status":
                                                        up.get("status")}))
    return parts


def fetch_json(url: str, timeout: float = PROBE_TIMEOUT) -> dict:
    """The JSON object ``url`` answers with, whatever its status (``/healthz`` answers 503
    with its report when a model is not well)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(1 << 20)
    except urllib.error.HTTPError as err:
        body = err.read(1 << 20)
    found = json.loads(body)
    if not isinstance(found, dict):
        raise ValueError(f"{url} answered {type(found).__name__}, not a JSON object")
    return found


def upstream_parts(serve_url: str, details: dict, deadline: float = PROBE_TIMEOUT
                   ) -> list[dict]:
    """The ``upstream:<model>`` parts (``Part`` keyword arguments) of every app of Ray's serve
    ``details`` that has ``openai-upstream`` models, each app's ``/healthz`` asked within
    ``deadline`` seconds."""
    end = time.monotonic() + deadline
    parts: list[dict] = []
    for app in (details.get("applications") or {}).values():
        models = upstream_models(app)
        if not models:
            continue
        url = f"{serve_url}{(app.get('route_prefix') or '/').rstrip('/')}/healthz"
        try:
            left = end - time.monotonic()
            if left < 0.2:
                raise TimeoutError("no time left in the report")
            found: dict | BaseException = fetch_json(url, min(PROBE_TIMEOUT, left))
        except (OSError, ValueError) as err:
            found = err
        parts += assess_upstreams(models, found, url)
    return sorted(parts, key=lambda p: p["name"])


__all__ = ["SERVE_APP_IMPORT", "UPSTREAM_ENGINE", "assess_upstreams", "fetch_json",
           "upstream_models", "upstream_parts"]
