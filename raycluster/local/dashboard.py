"""The local platform's client of the Ray dashboard and its state API (with the cluster
token), and the readiness waits a start goes through: a URL answers, enough Ray nodes joined,
and no process the platform started has died meanwhile."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from raycluster.errors import PlatformError
from raycluster.local.processes import ManagedProcess, log_tail

#: What a node listing may fail with while the cluster is still starting.
NOT_READY = (urllib.error.URLError, OSError, KeyError, ValueError)


class Dashboard:
    """The Ray dashboard at ``url``, reached with the token in ``token_path``."""

    def __init__(self, url: str, token_path: Path):
        self.url = url
        self.token_path = token_path

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def get_json(self, path: str, timeout: float = 5.0) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", headers=self.auth_headers())
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        """Alive Ray nodes from the state API: node id, pool label, resources."""
        data = self.get_json("/api/v0/nodes?limit=100&detail=true")
        nodes = data["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]


def node_summary(node: dict) -> dict:
    """A node of the state API as ``rayplane status`` shows it: id, pool, role and the
    resources it advertises (without the per-node and memory entries)."""
    labels = node.get("labels") or {}
    return {
        "node_id": node["node_id"],
        "pool": labels.get("rayplane.io/pool"),
        "head": node.get("is_head_node", False),
        "resources": {k: v for k, v in (node.get("resources_total") or {}).items()
                      if not k.startswith(("node:", "memory", "object_store_memory"))},
    }


# -- readiness -----------------------------------------------------------------------------


def raise_if_died(processes: Iterable[ManagedProcess]) -> None:
    """PlatformError, with the last lines of its log, when a started process has exited."""
    for proc in processes:
        if not proc.alive():
            tail = log_tail(Path(proc.log), 5)
            raise PlatformError(f"{proc.name} exited while starting; last log lines: {tail}")


def wait_http(url: str, timeout: float, what: str, *, processes: Iterable[ManagedProcess],
              logs: Path, headers: dict | None = None) -> None:
    """Wait until ``url`` answers; PlatformError when it does not within ``timeout`` or when
    one of ``processes`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raise_if_died(processes)
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=3):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise PlatformError(f"{what} did not answer at {url} within {timeout:.0f}s; "
                        f"see the logs in {logs}")


def wait_for_nodes(dashboard: Dashboard, count: int, timeout: float, *,
                   processes: Iterable[ManagedProcess], logs: Path) -> None:
    """Wait until ``count`` Ray nodes are alive; PlatformError when they are not within
    ``timeout`` or when one of ``processes`` dies first."""
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        raise_if_died(processes)
        try:
            alive = len(dashboard.alive_nodes())
            if alive >= count:
                return
        except NOT_READY:
            pass
        time.sleep(1)
    raise PlatformError(f"only {alive} of {count} Ray nodes joined within {timeout:.0f}s; "
                        f"see the logs in {logs}")


__all__ = ["Dashboard", "node_summary", "raise_if_died", "wait_for_nodes", "wait_http"]
