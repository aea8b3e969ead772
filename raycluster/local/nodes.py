"""The local platform's Ray nodes: starting one (with the environment its role needs), killing
one, and starting one again after it died, as a Kubernetes pod restart would.

A node's whole environment beyond the platform's own is recorded with its process
(``ManagedProcess.env``; never a secret), so a restart -- by ``rayplane up``, by the node
supervisor of an ``--ha`` platform (raycluster/local/supervisor.py) or by a test -- starts it
exactly as ``up`` did: same command line, same ports, same Serve proxy port.

A head restart is what KubeRay's GCS fault tolerance does on a pod restart: the new head reads
the cluster's tables back from Redis (``RAY_REDIS_ADDRESS``, the same
``RAY_external_storage_namespace``), and the worker raylets, which wait
``gcs_rpc_server_reconnect_timeout_s`` for their GCS, reconnect to it. Ray's CLI refuses to
start a head on the GCS address it finds in the temp folder's ``ray_current_cluster`` file
("already running"), so that file goes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from raycluster.errors import PlatformError
from raycluster.local.dashboard import NOT_READY, node_summary, wait_for_nodes, wait_http
from raycluster.local.processes import (
    ManagedProcess,
    free_port,
    free_ports,
    kill_group,
    stop_sessions,
)
from raycluster.local.services import haproxy_env, ray_node_command
from raycluster.local.state import LocalState, NodePlan, state_lock

if TYPE_CHECKING:
    from raycluster.local.cluster import LocalCluster

#: How often one Ray node is started before the start gives up: ``ray start`` gives a raylet
#: 30 s to register, which a loaded 2-core machine can miss.
NODE_START_ATTEMPTS = 5
#: Seconds a raylet waits for its GCS before it exits (Ray's default is 60): the head of an
#: ``--ha`` platform must be back within it, and a loaded 2-core machine restarts it in 10-30 s.
GCS_RECONNECT_TIMEOUT_S = 120


def process_name(node: NodePlan) -> str:
    return f"ray-{node.role}-{node.pool}"


def node_env(cluster: LocalCluster, node: NodePlan, st: LocalState) -> dict[str, str]:
    """What ``node`` is started with beyond the platform's environment (no secrets)."""
    env: dict[str, str] = {}
    if node.role == "worker":
        # The worker's own Serve proxy port, behind the platform's ingress (ingress.py).
        env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(free_port())
    if cluster.serve_proxy == "haproxy":
        # Each node's HAProxy keeps its files and its two ports to itself: they share a host.
        # The folder is named by the node's place in the plan: HAProxy's socket paths
        # (<folder>/<56-char node id>/<name>) must stay within 97 bytes.
        index = [n.pool for n in cluster.node_plan()].index(node.pool)
        env.update(haproxy_env(cluster.haproxy_dir / f"n{index}", *free_ports(2)))
    if node.role == "head" and cluster.metrics:
        env["RAY_PROMETHEUS_HOST"] = cluster.prometheus_url
    if st.ha:
        env["RAY_gcs_rpc_server_reconnect_timeout_s"] = str(GCS_RECONNECT_TIMEOUT_S)
        if node.role == "head":
            env["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{cluster.ports['redis']}"
            env["RAY_external_storage_namespace"] = st.storage_namespace
    return env


def spawn_node(cluster: LocalCluster, name: str, argv: list[str], env: dict[str, str],
               ha: bool) -> ManagedProcess:
    """Start a node's ``ray start``. The head of an ``--ha`` platform gets the Redis password
    as Ray's CLI takes it (a flag) at spawn time only: the recorded command line never has it."""
    secret = ([f"--redis-password={cluster.redis_password_path.read_text().strip()}"]
              if ha and "--head" in argv else [])
    proc = cluster.spawn(name, argv + secret, env)
    proc.argv = argv
    return proc


def start_node(cluster: LocalCluster, node: NodePlan, joined: int, st: LocalState,
               timeout: float, step: Callable[[str], object]) -> None:
    """Start one Ray node and wait until ``joined`` nodes are alive.

    One node at a time, and a node that missed its registration is started again (up to
    NODE_START_ATTEMPTS tries in all): ``ray start`` gives a raylet 30 s to register,
    which a loaded 2-core machine can miss when several start at once."""
    temp_dir = Path(st.temp_dir)
    step(f"starting Ray {node.role} node for pool {node.pool}")
    argv, env = ray_node_command(node, cluster.ports, temp_dir), node_env(cluster, node, st)
    for attempt in range(1, NODE_START_ATTEMPTS + 1):
        proc = spawn_node(cluster, process_name(node), argv, env, st.ha)
        st.processes.append(proc)
        st.save()
        try:
            wait_node(cluster, node, joined, st, timeout)
            return
        except PlatformError:
            if proc.alive() or attempt == NODE_START_ATTEMPTS:
                raise
            # What the failed `ray start` left behind (its group is ours) goes, and so
            # does its record of a running cluster, before the next try.
            kill_group(proc.pid)
            (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
            st.processes.remove(proc)
            st.save()
            step(f"Ray {node.role} node for pool {node.pool} missed its start "
                 f"(try {attempt} of {NODE_START_ATTEMPTS}); starting it again")
            time.sleep(2 * attempt)


def wait_node(cluster: LocalCluster, node: NodePlan, joined: int, st: LocalState,
              timeout: float) -> None:
    if node.role == "head":
        cluster.wait_http(f"{cluster.dashboard_url}/api/version", timeout, st, "Ray dashboard",
                          headers=cluster.auth_headers())
    wait_for_nodes(cluster.dashboard, joined, timeout, processes=st.processes,
                   logs=cluster.logs_dir)


def node_of(st: LocalState, pool: str) -> tuple[NodePlan, ManagedProcess]:
    """The planned node of ``pool`` and its recorded process."""
    for n in st.nodes:
        node = NodePlan(**n)
        if node.pool == pool:
            proc = next((p for p in st.processes if p.name == process_name(node)), None)
            if proc is not None:
                return node, proc
    pools = ", ".join(n["pool"] for n in st.nodes)
    raise PlatformError(f"pool: {pool!r} has no Ray node on this platform (pools: {pools})")


def kill_node(cluster: LocalCluster, pool: str) -> None:
    """SIGKILL the Ray node of ``pool``: its ``ray start``, raylet and everything they started
    (a node lost with its machine)."""
    st = cluster.state()
    if st is None:
        raise PlatformError("no local platform is up (run `rayplane up`)")
    _, proc = node_of(st, pool)
    kill_group(proc.pid)
    stop_sessions({proc.pid}, timeout=5.0)


def pool_node_ids(cluster: LocalCluster, pool: str) -> set[str]:
    """Ids of the alive Ray nodes of ``pool`` (empty while the dashboard does not answer)."""
    try:
        return {n["node_id"] for n in map(node_summary, cluster.alive_nodes())
                if n["pool"] == pool}
    except NOT_READY:
        return set()


def restart_node(cluster: LocalCluster, pool: str, timeout: float = 180.0) -> ManagedProcess:
    """Start the Ray node of ``pool`` again if it is dead (what is left of it goes first) and
    wait until it has joined as a new node; returns its process. A node that is alive is left
    alone (the supervisor got there first): this then waits for it to be registered."""
    with state_lock(cluster.state_dir):
        st = cluster.state()
        if st is None:
            raise PlatformError("no local platform is up (run `rayplane up`)")
        node, proc = node_of(st, pool)
        before = pool_node_ids(cluster, pool)
        if not proc.alive():
            kill_group(proc.pid)
            stop_sessions({proc.pid}, timeout=5.0)
            if node.role == "head":
                (Path(st.temp_dir) / "ray_current_cluster").unlink(missing_ok=True)
            new = spawn_node(cluster, proc.name, proc.argv, proc.env, st.ha)
            st.processes[st.processes.index(proc)] = new
            st.save()
            proc = new
        else:
            before = set()  # alive already: any registered node of the pool will do
    if node.role == "head":
        # Only this node's process counts here: others may be dead too (`up` restarts them next).
        wait_http(f"{cluster.dashboard_url}/api/version", timeout, "Ray dashboard",
                  processes=[proc], logs=cluster.logs_dir, headers=cluster.auth_headers())
    deadline = time.monotonic() + timeout
    while not pool_node_ids(cluster, pool) - before:
        if not proc.alive():
            raise PlatformError(f"the Ray node of pool {pool} exited while restarting; see "
                                f"{proc.log}")
        if time.monotonic() > deadline:
            raise PlatformError(f"the Ray node of pool {pool} did not join within "
                                f"{timeout:.0f}s; see {proc.log}")
        time.sleep(1)
    return proc


__all__ = ["GCS_RECONNECT_TIMEOUT_S", "NODE_START_ATTEMPTS", "kill_node", "node_env",
           "node_of", "pool_node_ids", "process_name", "restart_node", "spawn_node", "start_node"]
