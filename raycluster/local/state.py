"""What the local platform records: its ports, the state folder and its secrets, the Ray
nodes it plans from the catalog, and ``state.json`` -- the process groups it started, which is
all ``rayplane down`` ever signals."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raycluster.local.processes import ManagedProcess

#: Ray processes need these to enforce and to present the cluster token.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

#: ``serve`` is the platform's Serve ingress (what clients call); ``serve_head`` is the head
#: node's own Serve proxy behind it (raycluster/local/ingress.py).
DEFAULT_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "mlflow": 5000,
                 "serve": 8000, "serve_head": 8001, "prometheus": 9090, "postgres": 5432,
                 "redis": 6380}
#: Ports of the services that only run when asked for: port name -> the option that asks.
OPTIONAL_PORTS = {"prometheus": "metrics", "redis": "ha"}
PORT_ENV = {name: f"RAYPLANE_{name.upper()}_PORT" for name in DEFAULT_PORTS}

#: Serve's HTTP ingress: HAProxy in front of the ingress replicas, or Ray's Python proxy actor.
SERVE_PROXIES = ("haproxy", "ray")


def default_state_dir() -> Path:
    return Path(os.environ.get("RAYPLANE_STATE_DIR", Path.cwd() / ".rayplane")).resolve()


def write_secret(path: Path, value: str) -> None:
    """Write a secret readable by its owner only (mode 0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


@dataclass
class NodePlan:
    """A Ray node of the local cluster and the pool it stands for."""

    pool: str
    role: str  # "head" or "worker"
    num_cpus: int
    resources: dict[str, float]
    object_store_mb: int


@dataclass
class LocalState:
    state_dir: str
    ports: dict[str, int]
    temp_dir: str
    nodes: list[dict] = field(default_factory=list)
    processes: list[ManagedProcess] = field(default_factory=list)
    catalog: str | None = None
    mlflow_backend_uri: str = ""
    mlflow_artifacts: str = ""
    metrics: bool = False
    workers_per_pool: int = 2
    # A state file written before the choice existed is a platform on Ray's proxy.
    serve_proxy: str = "ray"
    #: Head fault tolerance: GCS state in the platform's Redis, nodes restarted when they die.
    ha: bool = False
    #: The GCS's key prefix in Redis (KubeRay uses the RayCluster's UID): one per ``up``, kept
    #: across head restarts so that the new head finds the cluster's state.
    storage_namespace: str = ""

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / "state.json"

    def save(self) -> None:
        data = asdict(self)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)

    @classmethod
    def load(cls, state_dir: Path) -> LocalState | None:
        path = state_dir / "state.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["processes"] = [ManagedProcess(**p) for p in data.get("processes", [])]
        return cls(**data)


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Serialise the read-modify-write of ``state.json`` between the CLI and the node
    supervisor (both restart processes and record their new pids)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "state.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = [
    "AUTH_MODE_ENV",
    "AUTH_TOKEN_PATH_ENV",
    "DEFAULT_PORTS",
    "OPTIONAL_PORTS",
    "PORT_ENV",
    "SERVE_PROXIES",
    "LocalState",
    "NodePlan",
    "default_state_dir",
    "state_lock",
    "write_secret",
]
