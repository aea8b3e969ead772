"""The services beside Ray on the local platform, as ``LocalCluster`` starts, restarts and
waits for them: each one's command line (from the platform's ports and state) and what
"ready" means for it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from raycluster.errors import PlatformError
from raycluster.local.ingress import ingress_command
from raycluster.local.nodes import process_name, restart_node
from raycluster.local.processes import port_is_free
from raycluster.local.redis_store import redis_command, redis_ping
from raycluster.local.services import haproxy_binary, prometheus_command
from raycluster.local.state import LocalState, NodePlan

if TYPE_CHECKING:
    from raycluster.local.cluster import LocalCluster

#: The services beside Ray that ``restart_service`` knows, in the order ``up`` starts them.
SERVICES = ("postgres", "redis", "prometheus", "ingress", "mlflow", "supervisor")


def service_argv(cluster: LocalCluster, name: str, st: LocalState) -> list[str]:
    if name == "redis":
        return redis_command(cluster.state_dir / "redis", cluster.ports["redis"],
                             cluster.redis_password_path)
    if name == "prometheus":
        return prometheus_command(cluster.state_dir / "prometheus", Path(st.temp_dir),
                                  cluster.ports["prometheus"])
    if name == "ingress":
        workers = {p.name.split("-", 2)[2]: int(p.env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"])
                   for p in st.processes if "RAY_SERVE_WORKER_PROXY_HTTP_PORT" in p.env}
        return ingress_command(haproxy_binary(), cluster.ingress_dir, cluster.ports["serve"],
                               cluster.ports["serve_head"], workers)
    assert name == "supervisor", name
    return [sys.executable, "-m", "raycluster.local.supervisor", str(cluster.state_dir)]

def wait_service_ready(cluster: LocalCluster, name: str, st: LocalState, timeout: float) -> None:
    """Until the service answers (PostgreSQL, MLflow, Prometheus, Redis), or has its port
    (the ingress), or is simply running (the supervisor)."""
    if name == "postgres":
        cluster.postgres.wait_ready(timeout, st.processes, cluster.logs_dir)
    elif name == "mlflow":
        cluster.wait_http(f"{cluster.mlflow_uri}/health", timeout, st, "MLflow")
    elif name == "prometheus":
        cluster.wait_http(f"{cluster.prometheus_url}/-/ready", timeout, st, "Prometheus")
    elif name == "redis":
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis_ping(cluster.ports["redis"], cluster.redis_password_path, timeout=1.0)
                return
            except PlatformError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    elif name == "ingress":
        deadline = time.monotonic() + timeout
        while port_is_free(cluster.ports["serve"]):
            if time.monotonic() > deadline:
                raise PlatformError(f"the Serve ingress did not listen on port "
                                    f"{cluster.ports['serve']} within {timeout:.0f}s; see "
                                    f"{cluster.logs_dir / 'ingress.log'}")
            time.sleep(0.2)


def recover(cluster: LocalCluster, timeout: float = 180.0,
            progress: Callable[[str], object] | None = None) -> LocalState:
    """Start again every recorded process of this platform that died, services before
    Ray nodes, the head before the workers (as ``up`` ordered them)."""
    step = progress or (lambda msg: None)
    st = cluster.state()
    if st is None:
        raise PlatformError("no local platform is recorded here (run `rayplane up`)")
    nodes = {process_name(NodePlan(**n)): n["pool"] for n in st.nodes}
    for proc in [p for p in st.processes if not p.alive()]:
        step(f"starting {proc.name} again")
        if proc.name in nodes:
            restart_node(cluster, nodes[proc.name], timeout)
        else:
            cluster.restart_service(proc.name, timeout)
    return cluster.state() or st


__all__ = ["SERVICES", "recover", "service_argv", "wait_service_ready"]
