"""The local platform: a real multi-node Ray cluster on one machine, emulating the pools.

``rayplane up`` starts, with ``ray start`` processes, a head node for the CPU pool and one worker
node per GPU pool. Each worker advertises the custom resource its KubeRay worker group
advertises (``pool:<name>``, derived from the catalog), so work is placed exactly as on EKS.
There is no GPU here: a GPU pool's node advertises its GPU units as the pool resource with
``num-cpus 0`` (the head owns the machine's cores, so the cores are never oversubscribed) and
its work runs on CPU. Beside the cluster run a real MLflow tracking server and a real
PostgreSQL server (Debian's binaries; the agents' checkpoints, database ``agents``).

Security: Ray token authentication is always on (``RAY_AUTH_MODE=token``; the token is
generated into the state folder with mode 0600), the dashboard, MLflow, PostgreSQL and Serve
listen on 127.0.0.1 only, a local API key for the OpenAI endpoint is generated beside the
token, and so are PostgreSQL's superuser password and DSN (``postgres_password``,
``postgres_dsn``; SCRAM-SHA-256 authentication on every connection).

Every process is started in its own process session; its pid (= process group id) is recorded
in ``.rayplane/state.json`` and ``rayplane down`` signals exactly those groups, then what is
left in their sessions -- never processes found by name, so nothing else on the machine is
touched.

Modules: ``state`` (ports, the state folder and ``state.json``), ``processes`` (process groups,
sessions, ports), ``services`` (the command lines of Ray nodes, HAProxy, MLflow, Prometheus),
``postgres`` (PostgreSQL: binaries, initdb, its account when run as root, readiness),
``redis_store`` (the ``--ha`` head's Redis), ``ingress`` (the Serve ingress in front of the
nodes' proxies), ``service_control`` (each service's command and readiness), ``nodes``
(starting, killing and restarting a Ray node), ``supervisor`` (restarts dead nodes of an
``--ha`` platform), ``health`` (``rayplane status``'s report), ``dashboard`` (the dashboard
and state-API client, readiness waits) and ``cluster`` (``LocalCluster``: plan, up, recover,
down, status, restart of a service).
``LocalCluster.attach(state_dir)`` is the one way to reach a running platform.
"""

from raycluster.local.cluster import NODE_START_ATTEMPTS, LocalCluster
from raycluster.local.dashboard import Dashboard
from raycluster.local.postgres import LocalPostgres, find_bindir
from raycluster.local.processes import ManagedProcess, free_port, port_is_free, session_members
from raycluster.local.services import HAPROXY_LOOPBACK_WRAPPER, prometheus_config
from raycluster.local.state import (
    AUTH_MODE_ENV,
    AUTH_TOKEN_PATH_ENV,
    DEFAULT_PORTS,
    OPTIONAL_PORTS,
    PORT_ENV,
    SERVE_PROXIES,
    LocalState,
    NodePlan,
    default_state_dir,
)

__all__ = [
    "AUTH_MODE_ENV",
    "AUTH_TOKEN_PATH_ENV",
    "DEFAULT_PORTS",
    "HAPROXY_LOOPBACK_WRAPPER",
    "NODE_START_ATTEMPTS",
    "OPTIONAL_PORTS",
    "PORT_ENV",
    "SERVE_PROXIES",
    "Dashboard",
    "LocalCluster",
    "LocalPostgres",
    "LocalState",
    "ManagedProcess",
    "NodePlan",
    "default_state_dir",
    "find_bindir",
    "free_port",
    "port_is_free",
    "prometheus_config",
    "session_members",
]
