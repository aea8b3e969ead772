"""The local platform's lifecycle: ``LocalCluster`` plans a Ray node per pool from the
catalog, starts them one at a time with PostgreSQL and MLflow (and Prometheus when asked)
beside them, waits until each is ready, reports status, and stops exactly what it started.

``LocalCluster.attach(state_dir)`` is the one way to reach a platform that is already up: it
comes back with the ports and options the platform was started with.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from raycluster.catalog import Catalog, load_catalog
from raycluster.errors import PlatformError
from raycluster.local.dashboard import Dashboard, node_summary, wait_http
from raycluster.local.nodes import (
    NODE_START_ATTEMPTS,
    kill_node,
    restart_node,
    start_node,
)
from raycluster.local.postgres import LocalPostgres, redacted_dsn, server_env, service_user
from raycluster.local.processes import (
    ManagedProcess,
    port_is_free,
    stop_group,
    stop_sessions,
)
from raycluster.local.service_control import SERVICES, recover, service_argv, wait_service_ready
from raycluster.local.services import mlflow_command
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
    state_lock,
    write_secret,
)
from raycluster.spec import SpecError


class LocalCluster:
    """The local platform rooted at a state folder (default ``./.rayplane``)."""

    def __init__(self, state_dir: Path | None = None, catalog: Catalog | None = None,
                 catalog_path: Path | None = None, ports: dict[str, int] | None = None,
                 workers_per_pool: int = 2, metrics: bool = False,
                 serve_proxy: str = "haproxy", ha: bool = False):
        if serve_proxy not in SERVE_PROXIES:
            raise SpecError(f"serve_proxy: {serve_proxy!r} is not one of "
                            f"{', '.join(SERVE_PROXIES)}", field="serve_proxy")
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
        # Head fault tolerance: the GCS's state in a real Redis, and a supervisor that starts
        # a dead Ray node again (raycluster/local/nodes.py, supervisor.py).
        self.ha = ha

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
                   serve_proxy=st.serve_proxy, ha=st.ha)

    # -- paths and addresses ------------------------------------------------------------

    @property
    def token_path(self) -> Path:
        return self.state_dir / "auth_token"

    @property
    def api_key_path(self) -> Path:
        return self.state_dir / "api_key"

    @property
    def redis_password_path(self) -> Path:
        return self.state_dir / "redis_password"

    @property
    def serve_record_path(self) -> Path:
        """The Serve config last applied through rayplane (``rayplane up`` restores it)."""
        return self.state_dir / "serve-applied.json"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

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
    def ingress_dir(self) -> Path:
        return self.haproxy_dir / "ingress"

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

    def serve_proxy_urls(self) -> tuple[str, ...]:
        """The Serve proxies behind the ingress: the head's, then each worker node's."""
        st = self.state()
        workers = [p.env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] for p in (st.processes if st else [])
                   if "RAY_SERVE_WORKER_PROXY_HTTP_PORT" in p.env]
        return tuple(f"http://127.0.0.1:{port}" for port in
                     [self.ports["serve_head"], *workers])

    @property
    def agents_url(self) -> str:
        return f"{self.serve_url}/agents"  # agents/configs/local.yaml's route prefix

    @property
    def postgres(self) -> LocalPostgres:
        """The platform's PostgreSQL (database ``agents``); its DSN is in ``dsn_path``."""
        return LocalPostgres(self.state_dir, self.ports["postgres"])

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
            "RAYPLANE_AGENTS_URL": self.agents_url,
            "RAYPLANE_POSTGRES_DSN_FILE": str(self.postgres.dsn_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        if self.catalog_path:
            env["RAYPLANE_CATALOG"] = str(Path(self.catalog_path).resolve())
        return env

    # -- the dashboard ------------------------------------------------------------------

    @property
    def dashboard(self) -> Dashboard:
        return Dashboard(self.dashboard_url, self.token_path)

    def auth_headers(self) -> dict[str, str]:
        return self.dashboard.auth_headers()

    def get_json(self, path: str, timeout: float = 5.0) -> dict:
        return self.dashboard.get_json(path, timeout)

    def alive_nodes(self) -> list[dict]:
        """Alive Ray nodes from the state API: node id, pool label, resources."""
        return self.dashboard.alive_nodes()

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

    def up(self, timeout: float = 180.0,
           progress: Callable[[str], object] | None = None) -> LocalState:
        """Start the platform; a no-op when this state folder's platform is already up. An
        ``--ha`` platform that lost parts (its head, a node, a service) gets exactly those
        back, its cluster state intact; any other platform with dead parts is stopped and
        started anew (the CLI then restores its Serve applications)."""
        existing = self.state()
        if existing and existing.processes:
            self._adopt(existing)
            if all(p.alive() for p in existing.processes):
                return existing
            if existing.ha:
                return self.recover(timeout, progress)
            # Part of an earlier platform is still running (or died): clean it up first.
            self.down()
        self._check_ports_free()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        write_secret(self.token_path, secrets.token_hex(32))
        if not self.api_key_path.exists():
            write_secret(self.api_key_path, "rp-" + secrets.token_urlsafe(32))
        temp_dir = self.temp_dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        st = LocalState(state_dir=str(self.state_dir), ports=dict(self.ports),
                        temp_dir=str(temp_dir),
                        catalog=str(self.catalog_path) if self.catalog_path else None,
                        metrics=self.metrics, workers_per_pool=self.workers_per_pool,
                        serve_proxy=self.serve_proxy, ha=self.ha,
                        storage_namespace=uuid.uuid4().hex if self.ha else "")
        st.save()
        step = progress or (lambda msg: None)
        try:
            # PostgreSQL first (a missing install fails before Ray's long start), ready-checked
            # last: it starts while the Ray nodes do.
            step("starting PostgreSQL")
            st.processes.append(self._spawn_postgres(self.postgres.prepare(self.logs_dir)))
            st.save()
            if self.ha:
                step("starting Redis (the head's GCS store)")
                if not self.redis_password_path.exists():
                    write_secret(self.redis_password_path, secrets.token_urlsafe(32))
                self._start_service(st, "redis", service_argv(self, "redis", st), timeout)
            if self.metrics:
                step("starting Prometheus")
                self._start_service(st, "prometheus", service_argv(self, "prometheus", st),
                                    timeout)
            plan = self.node_plan()
            st.nodes = [asdict(n) for n in plan]
            for joined, node in enumerate(plan, start=1):
                start_node(self, node, joined, st, timeout, step)
            step("starting the Serve ingress")
            self._start_service(st, "ingress", service_argv(self, "ingress", st), timeout)
            step("starting the MLflow tracking server")
            argv, st.mlflow_backend_uri, st.mlflow_artifacts = mlflow_command(
                self.state_dir / "mlflow", self.ports["mlflow"])
            self._start_service(st, "mlflow", argv, timeout)
            step("waiting for PostgreSQL")
            self.postgres.wait_ready(timeout, st.processes, self.logs_dir)
            if self.ha:
                self._start_service(st, "supervisor", service_argv(self, "supervisor", st),
                                    timeout)
        except BaseException:
            self.down()
            raise
        return st

    def _adopt(self, st: LocalState) -> None:
        """Take the options of the platform recorded in ``st``."""
        self.ports, self.metrics = st.ports, st.metrics
        self.workers_per_pool, self.serve_proxy, self.ha = (st.workers_per_pool,
                                                           st.serve_proxy, st.ha)

    def recover(self, timeout: float = 180.0,
                progress: Callable[[str], object] | None = None) -> LocalState:
        """Start again every recorded process of this platform that died (services before
        Ray nodes, the head before the workers, as ``up`` ordered them)."""
        return recover(self, timeout, progress)

    def kill_node(self, pool: str) -> None:
        """SIGKILL the Ray node of ``pool`` with everything it started (fault tests)."""
        kill_node(self, pool)

    def restart_node(self, pool: str, timeout: float = 180.0) -> ManagedProcess:
        """Start the Ray node of ``pool`` again when it died; wait until it has joined."""
        return restart_node(self, pool, timeout)

    def down(self, timeout: float = 30.0) -> list[str]:
        """Stop exactly the process groups this state folder recorded; returns their names."""
        st = self.state()
        if st is None:
            return []
        stopped = []
        # Reverse start order: MLflow, workers, then the head (GCS last).
        for proc in reversed(st.processes):
            if stop_group(proc, timeout):
                stopped.append(proc.name)
        # Ray workers lead process groups of their own inside the session of the `ray start`
        # that spawned them, and a child a worker started (HAProxy, after a reload) outlives
        # its worker; every process left in one of the sessions rayplane started goes too.
        stop_sessions({proc.pid for proc in st.processes}, timeout=5.0)
        st.path.unlink(missing_ok=True)
        shutil.rmtree(st.temp_dir, ignore_errors=True)
        shutil.rmtree(self.haproxy_dir, ignore_errors=True)
        self.postgres.cleanup()
        return stopped

    def restart_service(self, name: str, timeout: float = 60.0) -> ManagedProcess:
        """Stop one service beside Ray (one of SERVICES) and start it again with the same
        command line, as after a crash; returns its new process once it is ready."""
        with state_lock(self.state_dir):
            st = self.state()
            proc = next((p for p in (st.processes if st else []) if p.name == name), None)
            if st is None or proc is None or name not in SERVICES:
                raise PlatformError(f"{name} is not a running service of this platform "
                                    f"({', '.join(SERVICES)}, as it was started); is it up?")
            stop_group(proc, timeout)
            new = (self._spawn_postgres(proc.argv) if name == "postgres" else
                   self.spawn(name, proc.argv, proc.env))
            st.processes[st.processes.index(proc)] = new
            st.save()
        wait_service_ready(self, name, st, timeout)
        return new

    def _start_service(self, st: LocalState, name: str, argv: list[str],
                       timeout: float) -> None:
        st.processes.append(self.spawn(name, argv))
        st.save()
        wait_service_ready(self, name, st, timeout)

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

    def spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None,
               *, env: dict[str, str] | None = None, stop_signal: str = "",
               **popen: object) -> ManagedProcess:
        """Start ``argv`` in a session of its own (its pid is its group), logging to
        ``logs/<name>.log``, with the cluster's environment (or ``env``)."""
        log = self.logs_dir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env=env or {**self._process_env(), **(extra_env or {})},
                                    start_new_session=True, **{"cwd": self.state_dir, **popen})
        return ManagedProcess(name=name, pid=proc.pid, argv=argv, log=str(log),
                              stop_signal=stop_signal, env=dict(extra_env or {}))

    def _spawn_postgres(self, argv: list[str]) -> ManagedProcess:
        """The server, as the unprivileged account when rayplane runs as root, stopped by
        its fast shutdown (SIGINT: clients are disconnected, a checkpoint is written)."""
        user = service_user()
        self.postgres.wait_for_orphans(argv)
        return self.spawn("postgres", argv, env=server_env(), stop_signal="SIGINT", cwd="/",
                           **(user.popen_kwargs() if user else {}))

    # -- readiness ----------------------------------------------------------------------

    def _check_ports_free(self) -> None:
        for name, port in self.ports.items():
            if name in OPTIONAL_PORTS and not getattr(self, OPTIONAL_PORTS[name]):
                continue
            if not port_is_free(port):
                raise PlatformError(
                    f"port {port} ({name}) is in use by another process; stop it or choose "
                    f"another port with {PORT_ENV[name]}=<port>")

    def wait_http(self, url: str, timeout: float, st: LocalState, what: str,
                   headers: dict | None = None) -> None:
        wait_http(url, timeout, what, processes=st.processes, logs=self.logs_dir,
                  headers=headers)

    # -- status -------------------------------------------------------------------------

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
            "postgres": redacted_dsn(self.ports["postgres"]),
            "postgres_dsn_file": str(self.postgres.dsn_path),
            "prometheus": self.prometheus_url if st and st.metrics else None,
            "ha": bool(st and st.ha),
            "redis": f"127.0.0.1:{self.ports['redis']}" if st and st.ha else None,
            "token_file": str(self.token_path),
            "api_key_file": str(self.api_key_path),
            "processes": [{"name": p.name, "pid": p.pid, "alive": p.alive()}
                          for p in (st.processes if st else [])],
            "nodes": [],
        }
        if up:
            try:
                for n in self.alive_nodes():
                    info["nodes"].append(node_summary(n))
            except (urllib.error.URLError, OSError, KeyError):
                pass
        return info


__all__ = ["NODE_START_ATTEMPTS", "SERVICES", "LocalCluster"]
