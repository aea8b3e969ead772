"""Small real feature stores for unit tests: the project's feature repository (features.repo)
applied to a registry in a temporary folder, with Feast's SQLite online store holding the
pool_load rows a test chooses, and the same registry behind PostgreSQL online stores that are
down (a closed port) or hang (a socket that accepts and never answers)."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

#: pool_load rows the stores hold (what `rayplane features materialize` would have written).
POOL_LOAD = {
    "h100-timeslice": {"running_units": 6, "pending_units": 4, "free_units": 2,
                       "gpu_utilization": 0.81, "mean_wait_1h_s": 312.5},
    "a100-mig": {"running_units": 1, "pending_units": 0, "free_units": 15,
                 "gpu_utilization": 0.2, "mean_wait_1h_s": 3.0},
}
PASSWORD_ENV = "RAYPLANE_FEAST_DB_PASSWORD"  # pragma: allowlist secret (a variable name)


def _config(root: Path, online: dict) -> dict:
    return {"project": "rayplane", "provider": "local",
            "registry": {"registry_type": "file", "path": str(root / "registry.db")},
            "online_store": online, "offline_store": {"type": "file"},
            "entity_key_serialization_version": 3}


def sqlite_store(root: Path, pool_load: dict[str, dict] | None = None) -> Path:
    """A feature store under ``root`` with the repository applied and ``pool_load`` (default
    :data:`POOL_LOAD`) in its SQLite online store, timestamped now; its yaml's path."""
    import pandas as pd

    from features.repo import POOL_LOAD as VIEW
    from features.repo import feature_objects
    from features.store import feature_store

    root.mkdir(parents=True, exist_ok=True)
    path = root / "feature_store.yaml"
    path.write_text(yaml.safe_dump(_config(root, {"type": "sqlite",
                                                  "path": str(root / "online.db")})))
    store = feature_store(path)
    store.apply(feature_objects(str(root / "data")))
    rows = pool_load if pool_load is not None else POOL_LOAD
    now = pd.Timestamp.now(tz="UTC")
    store.write_to_online_store(VIEW, pd.DataFrame(
        [{"pool": pool, "event_timestamp": now, "created": now, **values}
         for pool, values in rows.items()]))
    return path


def postgres_store(root: Path, port: int, name: str) -> Path:
    """A yaml beside ``sqlite_store(root)``'s (same registry) whose online store is a
    PostgreSQL at 127.0.0.1:``port``; the password comes from ${RAYPLANE_FEAST_DB_PASSWORD}."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(root, {
        "type": "postgres", "host": "127.0.0.1", "port": port, "database": "feast",
        "user": "feast", "password": "${" + PASSWORD_ENV + "}", "sslmode": "disable"})))
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def silent_listener() -> socket.socket:
    """A loopback socket that accepts connections (the kernel's backlog) and never answers:
    a database that hangs. Close it when done."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


__all__ = ["PASSWORD_ENV", "POOL_LOAD", "closed_port", "postgres_store", "silent_listener",
           "sqlite_store"]
