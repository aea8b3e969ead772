"""The local platform's health, as ``rayplane status`` reports it: every part ``rayplane up``
started and every Serve application on it, probed for real, up, degraded or down with a reason.

- ``ray``: the head and each pool's node alive per the state API (no head: down; a worker
  missing: degraded). ``serve``: ``/-/healthz`` through the Serve port, once Serve runs.
- ``serve:<app>``, ``agents:<app>``: Ray's own statuses (application, deployments, running
  replicas out of the target); the agents API app also answers ``<route>/ok`` (API key).
- ``upstream:<model>``: an ``openai-upstream`` model's server as its replica last saw it
  (raycluster/local/upstream_health.py).
- The services recorded beside Ray: ``mlflow`` (``/health``), ``postgres`` (the DSN file,
  ``SELECT 1``), ``redis`` (``--ha``: ``AUTH``, ``PING``), ``prometheus`` (``/-/ready``), the
  ``ingress`` (takes connections), others (the ``--ha`` supervisor) while their process runs.

The probes run at once, each with a short timeout, and one still running at the deadline is
down: a report takes a few seconds at most even when a part hangs. ``assess_*`` are the pure
mappings from what a probe saw to a status.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raycluster.local.dashboard import node_summary

if TYPE_CHECKING:
    from raycluster.local.cluster import LocalCluster
    from raycluster.local.state import LocalState

UP, DEGRADED, DOWN = "up", "degraded", "down"
RANK = {UP: 0, DEGRADED: 1, DOWN: 2}
#: Seconds one HTTP, PostgreSQL or Redis probe may take; the dashboard's node listing gets a
#: little more, its serve details most of the report's deadline.
PROBE_TIMEOUT = 2.0
DASHBOARD_TIMEOUT = 3.0
#: Seconds the whole report may take: a probe still running then is reported down.
REPORT_DEADLINE = 4.5
#: The agents API application's builder (``agents.serve_app.API_IMPORT_PATH``; not imported:
#: the agents package loads MLflow, which a status report has no use for).
AGENTS_API_IMPORT = "agents.server.app:build_agents_app"
AGENTS_MCP_IMPORT = "agents.mcp_server:build_mcp_app"
#: Deployment statuses of a deployment at work (autoscaling is normal operation).
SCALING = ("UPSCALING", "DOWNSCALING")


@dataclass
class Part:
    """One part of the platform and what its probe found."""

    name: str
    status: str
    reason: str
    url: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "name" and v not in (None, {})}


def worst(*statuses: str) -> str:
    return max(statuses, key=RANK.__getitem__, default=UP)


def why(err: BaseException) -> str:
    """An exception as the rest of one line."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    text = " ".join(str(err).split())
    return (text or type(err).__name__)[:300]


def first_line(text: str) -> str:
    """The line of a status message or error page that says what went wrong (a traceback's
    last; an HTML page's last line of text: HAProxy's ``No server is available ...``)."""
    lines = [ln.strip() for ln in re.sub(r"<[^>]*>", "\n", str(text)).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# -- probes (I/O) ------------------------------------------------------------------------------


def probe_http(name: str, url: str, headers: dict[str, str] | None = None,
               timeout: float = PROBE_TIMEOUT) -> Part:
    """Up when ``url`` answers 200, down otherwise (its status and first line, or why not)."""
    start = time.monotonic()
    try:
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                code, body = resp.status, b""
        except urllib.error.HTTPError as err:
            code, body = err.code, err.read(4096)
    except (OSError, ValueError) as err:
        return Part(name, DOWN, f"no answer at {url}: {why(err)}", url)
    ms = (time.monotonic() - start) * 1000
    if code == 200:
        return Part(name, UP, f"{url} answered in {ms:.0f} ms", url)
    text = first_line(body.decode(errors="replace"))
    return Part(name, DOWN, f"{url} answered HTTP {code}" + (f": {text}" if text else ""), url)


def probe_postgres(name: str, dsn: str, where: str, timeout: float = PROBE_TIMEOUT) -> Part:
    """Up when a password connection with ``dsn`` answers ``SELECT 1``."""
    import psycopg

    start = time.monotonic()
    try:
        # libpq's connect_timeout counts whole seconds, 2 at least.
        with psycopg.connect(dsn, connect_timeout=max(2, int(timeout)), autocommit=True) as conn:
            row = conn.execute("SELECT 1").fetchone()
    except (psycopg.Error, OSError) as err:
        return Part(name, DOWN, f"no connection to {where}: {why(err)}")
    if row != (1,):
        return Part(name, DOWN, f"SELECT 1 at {where} returned {row!r}")
    ms = (time.monotonic() - start) * 1000
    return Part(name, UP, f"SELECT 1 answered in {ms:.0f} ms at {where}")


def resp_command(*args: str) -> bytes:
    """One Redis command in RESP (binary-safe: any password goes through as it is)."""
    data = [arg.encode() for arg in args]
    return b"*%d\r\n" % len(data) + b"".join(b"$%d\r\n%s\r\n" % (len(d), d) for d in data)


def probe_redis(name: str, port: int, password_path: Path,
                timeout: float = PROBE_TIMEOUT) -> Part:
    """Up when Redis on 127.0.0.1:``port`` takes the password in ``password_path`` and answers
    ``PING``: one try on one socket (redis-py retries with backoff, up to 10 s on a hang)."""
    where = f"127.0.0.1:{port}"
    start = time.monotonic()
    try:
        password = password_path.read_text().strip()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(max(0.1, timeout - (time.monotonic() - start)))
            sock.sendall(resp_command("AUTH", password) + resp_command("PING"))
            with sock.makefile("rb") as reader:  # one reply line each; "" once it closes
                replies = [reader.readline().decode(errors="replace").strip() for _ in range(2)]
    except OSError as err:
        return Part(name, DOWN, f"no answer at {where}: {why(err)}")
    if replies[0] != "+OK":
        return Part(name, DOWN, f"AUTH at {where} refused: {replies[0][:200] or 'closed'}")
    if replies[1] != "+PONG":
        return Part(name, DOWN, f"PING at {where} answered {replies[1][:200] or 'nothing'}")
    ms = (time.monotonic() - start) * 1000
    return Part(name, UP, f"PING answered in {ms:.0f} ms at {where}")


def probe_listening(name: str, port: int, timeout: float = PROBE_TIMEOUT) -> Part:
    """Up when something takes a TCP connection on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            pass
    except OSError as err:
        return Part(name, DOWN, f"nothing takes connections on 127.0.0.1:{port}: {why(err)}")
    return Part(name, UP, f"listening on 127.0.0.1:{port}")


def run_concurrently(tasks: dict[str, Callable[[], Any]], deadline: float = REPORT_DEADLINE,
                     seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Each task's result (or the exception it raised) once all are done or ``deadline``
    seconds passed; a task still running then is a TimeoutError (its daemon thread is left to
    its own socket timeout). ``seconds`` gets how long each finished task took."""
    results: dict[str, Any] = {}
    took = seconds if seconds is not None else {}

    def run(name: str, task: Callable[[], Any]) -> None:
        start = time.monotonic()
        try:
            results[name] = task()
        except Exception as err:  # noqa: BLE001 - a probe's failure is its result
            results[name] = err
        took[name] = round(time.monotonic() - start, 3)

    threads = [threading.Thread(target=run, args=item, daemon=True, name=f"health-{item[0]}")
               for item in tasks.items()]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    late = TimeoutError(f"no answer within {deadline:.1f}s")
    return {name: results.get(name, late) for name in tasks}


# -- assessments (pure) ------------------------------------------------------------------------


def assess_ray(planned: list[dict], nodes: list[dict] | BaseException, url: str) -> Part:
    """The head and each planned pool node alive per the state API (``nodes``: its node
    records, or why the dashboard did not answer)."""
    if isinstance(nodes, BaseException):
        return Part("ray", DOWN, f"the Ray dashboard at {url} did not answer: {why(nodes)}", url)
    alive = [n for n in nodes if n.get("state", "ALIVE") == "ALIVE"]
    pools = {(n.get("labels") or {}).get("rayplane.io/pool") for n in alive}
    details = {"nodes": [node_summary(n) for n in alive]}
    head = [p["pool"] for p in planned if p.get("role") == "head"]
    if not any(n.get("is_head_node") for n in alive):
        return Part("ray", DOWN, f"the head node{' (pool ' + head[0] + ')' if head else ''} "
                                 "is not alive", url, details)
    workers = [p["pool"] for p in planned if p.get("role") != "head"]
    missing = [pool for pool in workers if pool not in pools]
    if missing:
        return Part("ray", DEGRADED, f"worker node of pool {', '.join(missing)} not alive "
                                     f"({len(alive)} of {len(planned)} nodes)", url, details)
    return Part("ray", UP, f"head and {len(workers)} worker nodes alive", url, details)


def assess_deployment(name: str, d: dict) -> tuple[str, str, dict]:
    """(status, one line, details) of one deployment of Ray's serve details."""
    ray_status = d.get("status", "UNKNOWN")
    running = sum(1 for r in d.get("replicas") or [] if r.get("state") == "RUNNING")
    target = d.get("target_num_replicas")
    line = f"{name} {ray_status} {running}/{target if target is not None else '?'} replicas"
    details = {"status": ray_status, "running_replicas": running, "target_replicas": target}
    if ray_status == "DEPLOY_FAILED":
        status = DOWN
    elif ray_status == "UNHEALTHY":
        status = DOWN if running == 0 else DEGRADED
    elif running == 0 and (target or 0) > 0:
        # Replicas on their way (an update, a scale-up from zero) or none left at all.
        status = DEGRADED if ray_status in ("UPDATING", "UPSCALING") else DOWN
    elif ray_status == "UPDATING" or (ray_status == "HEALTHY" and running < (target or 0)):
        status = DEGRADED
    else:  # HEALTHY, or autoscaling with replicas serving
        status = UP if ray_status in ("HEALTHY", *SCALING) else DEGRADED
    message = first_line(d.get("message") or "")
    if status != UP and message:
        line += f": {message}"
    return status, line, details


def app_kind(import_path: str) -> str:
    """``agents`` for the agents API and MCP apps (by their builders), else ``serve``."""
    return "agents" if import_path in (AGENTS_API_IMPORT, AGENTS_MCP_IMPORT) else "serve"


def assess_app(name: str, app: dict, http: Part | None = None) -> Part:
    """One Serve application from Ray's serve details (and, for the agents API app, its HTTP
    probe): RUNNING with healthy deployments is up; DEPLOYING, UPDATING, DELETING and a
    replica short are degraded; DEPLOY_FAILED, or UNHEALTHY with no replica running, is down."""
    kind = app_kind((app.get("deployed_app_config") or {}).get("import_path", ""))
    ray_status = app.get("status", "UNKNOWN")
    deployments = [assess_deployment(dn, d) for dn, d in (app.get("deployments") or {}).items()]
    status = worst(*(s for s, _, _ in deployments))
    if ray_status == "DEPLOY_FAILED":
        status = DOWN
    elif ray_status != "RUNNING":
        status = worst(status, DEGRADED)
    bad = [line for s, line, _ in deployments if s == status and s != UP]
    app_message = first_line(app.get("message") or "")
    reason = f"{ray_status}: " + "; ".join(bad or [line for _, line, _ in deployments]
                                          or [app_message or "no deployments"])
    if status != UP and app_message and not bad:
        reason += f" ({app_message})"
    details = {"ray_status": ray_status, "route_prefix": app.get("route_prefix"),
               "deployments": {dn: det for dn, (_, _, det)
                               in zip(app.get("deployments") or {}, deployments, strict=True)}}
    part = Part(f"{kind}:{name}", status, reason, details=details)
    if http is not None:
        part.url = http.url
        details["http"] = {"status": http.status, "reason": http.reason}
        if RANK[http.status] > RANK[part.status]:
            part.status, part.reason = http.status, f"Ray says {ray_status}, but {http.reason}"
    return part


def assess_apps(details: dict, recorded: dict[str, str], probes: dict[str, Part]) -> list[Part]:
    """Each application Serve runs, and each one last applied through rayplane (``recorded``:
    name -> import path) that Serve does not run any more: down."""
    running = details.get("applications") or {}
    parts = [assess_app(name, app, probes.get(name)) for name, app in running.items()]
    parts += [Part(f"{app_kind(path)}:{name}", DOWN, "deployed through rayplane, but Serve "
                   "does not run it (lost with the head?); `rayplane up` deploys it again")
              for name, path in recorded.items() if name not in running]
    return sorted(parts, key=lambda p: (p.name.startswith("agents:"), p.name))


def assess_ingress(details: dict | BaseException, healthz: Part,
                   expected: bool = False) -> Part | None:
    """Serve's HTTP ingress: its ``/-/healthz`` probe and the proxies' statuses; None when
    Serve does not run and nothing was deployed through rayplane (``expected``)."""
    if isinstance(details, BaseException):
        if healthz.status == UP:
            return Part("serve", DEGRADED, "the ingress answers; application statuses unknown "
                        f"(serve details: {why(details)})", healthz.url)
        return Part("serve", DOWN, f"{healthz.reason}; application statuses unknown (serve "
                    f"details: {why(details)})", healthz.url)
    if not (details.get("applications") or details.get("controller_info") or expected):
        return None
    proxies = details.get("proxies") or {}
    # A proxy STARTING or DRAINING (a node gaining or losing its replicas) is Serve at work.
    unhealthy = sorted({p.get("status", "?") for p in proxies.values()} & {"UNHEALTHY"})
    part = Part("serve", healthz.status, healthz.reason, healthz.url,
                {"proxies": {nid[:12]: p.get("status") for nid, p in proxies.items()}})
    if part.status == UP and unhealthy:
        part.status = DEGRADED
        part.reason += f"; proxies {', '.join(unhealthy)}"
    return part


def summarize(parts: list[Part]) -> dict[str, Any]:
    """The report: each part, the overall status (the worst part's) and one line naming the
    parts that are not up."""
    status = worst(*(p.status for p in parts)) if parts else DOWN
    sick = [f"{p.name} {p.status}" for p in parts if p.status != UP]
    reason = (", ".join(sick) if sick else f"all {len(parts)} parts up") if parts else \
        "no part reported"
    return {"status": status, "reason": reason, "parts": {p.name: p.to_dict() for p in parts}}


def exit_code(health: dict) -> int:
    """``rayplane status``'s exit code: 0 when every part is up, 1 otherwise."""
    return 0 if health.get("status") == UP else 1


def not_up() -> dict[str, Any]:
    """The report of a platform of which nothing runs."""
    return {"status": DOWN, "reason": "rayplane is not up", "parts": {}}


# -- the report ------------------------------------------------------------------------------


def _process_note(st: LocalState, name: str) -> str:
    """'; its process (pid N) has exited' when the recorded process ``name`` died."""
    proc = next((p for p in st.processes if p.name == name), None)
    if proc is not None and not proc.alive():
        return f"; its process (pid {proc.pid}) has exited"
    return ""


def _serve_task(cluster: LocalCluster, deadline: float) -> tuple[dict, dict, list[Part]]:
    """Ray's serve details, then the agents API apps' ``/ok`` probes (with the API key) and
    the ``openai-upstream`` models' parts, all within ``deadline`` seconds (the dashboard's
    first Serve call starts a Ray driver in it: 1-2 s, so it gets most of them)."""
    end = time.monotonic() + deadline
    details = cluster.dashboard.get_json("/api/serve/applications/", deadline - 0.4)
    key = cluster.api_key_path.read_text().strip() if cluster.api_key_path.exists() else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    probes = {}
    for name, app in (details.get("applications") or {}).items():
        config = app.get("deployed_app_config") or {}
        if config.get("import_path") == AGENTS_API_IMPORT and app.get("route_prefix"):
            url = f"{cluster.serve_url}{app['route_prefix'].rstrip('/')}/ok"
            left = min(PROBE_TIMEOUT, end - time.monotonic())
            probes[name] = probe_http(f"agents:{name}", url, headers, max(0.2, left))
    from raycluster.local.upstream_health import upstream_parts
    upstreams = [Part(**p) for p in upstream_parts(cluster.serve_url, details,
                                                   end - time.monotonic())]
    return details, probes, upstreams


def recorded_apps(cluster: LocalCluster) -> dict[str, str]:
    """The applications of the Serve config last applied through rayplane (the record
    ``rayplane up`` restores): name -> import path."""
    try:
        config = json.loads(cluster.serve_record_path.read_text())
        return {a["name"]: a.get("import_path", "") for a in config.get("applications") or []}
    except (AttributeError, OSError, ValueError, TypeError, KeyError):
        return {}


def service_probe(cluster: LocalCluster, name: str) -> Callable[[], Part]:
    """The probe of a recorded service beside Ray (by its process name); a service without
    one (the node supervisor) is up while its process runs."""
    if name == "postgres":
        pg = cluster.postgres
        return lambda: probe_postgres(name, pg.dsn_path.read_text().strip(), f"{pg.url}/agents")
    if name == "redis":
        return lambda: probe_redis(name, cluster.ports["redis"], cluster.redis_password_path)
    urls = {"mlflow": f"{cluster.mlflow_uri}/health",
            "prometheus": f"{cluster.prometheus_url}/-/ready"}
    if name in urls:
        return lambda: probe_http(name, urls[name])
    if name == "ingress":  # Serve's ingress in front of the nodes' proxies
        return lambda: probe_listening(name, cluster.ports["serve"])
    return lambda: Part(name, UP, "running")


def platform_health(cluster: LocalCluster, deadline: float = REPORT_DEADLINE) -> dict[str, Any]:
    """Probe every part of the platform recorded in ``cluster``'s state folder at once; the
    report of :func:`summarize` (:func:`not_up` when nothing of it runs)."""
    st = cluster.state()
    if st is None or not any(p.alive() for p in st.processes):
        return not_up()
    start = time.monotonic()
    nodes = {f"ray-{n['role']}-{n['pool']}" for n in st.nodes}
    services = [p.name for p in st.processes if p.name not in nodes]
    tasks: dict[str, Callable[[], Any]] = {
        "nodes": lambda: cluster.dashboard.get_json(
            "/api/v0/nodes?limit=100&detail=true", DASHBOARD_TIMEOUT)["data"]["result"]["result"],
        "serve": lambda: _serve_task(cluster, deadline - 0.1),
        "healthz": lambda: probe_http("serve", f"{cluster.serve_url}/-/healthz"),
        **{f"service:{name}": service_probe(cluster, name) for name in services},
    }
    seconds: dict[str, float] = {}
    found = run_concurrently(tasks, deadline, seconds)

    head = next((f"ray-head-{n['pool']}" for n in st.nodes if n.get("role") == "head"), "")
    ray = assess_ray(st.nodes, found["nodes"], cluster.dashboard_url)
    if ray.status == DOWN:
        ray.reason += _process_note(st, head)
    parts = [ray]
    serve = found["serve"]
    details, agents_probes, upstreams = serve if isinstance(serve, tuple) else (serve, {}, [])
    healthz = found["healthz"]
    if isinstance(healthz, BaseException):
        healthz = Part("serve", DOWN, f"no answer at {cluster.serve_url}/-/healthz: "
                                      f"{why(healthz)}", f"{cluster.serve_url}/-/healthz")
    recorded = recorded_apps(cluster)
    ingress = assess_ingress(details, healthz, expected=bool(recorded))
    if ingress is not None:
        parts.append(ingress)
    if not isinstance(details, BaseException):
        parts += assess_apps(details, recorded, agents_probes)
        parts += upstreams
    for name in services:
        part = found[f"service:{name}"]
        if isinstance(part, BaseException):
            part = Part(name, DOWN, why(part))
        note = _process_note(st, name)
        if note:  # a service whose process died is down, whatever answers on its port
            part.status, part.reason = DOWN, (part.reason if part.status == DOWN else
                                              "not running") + note
        parts.append(part)
    report = summarize(parts)
    report["seconds"] = round(time.monotonic() - start, 2)
    report["probe_seconds"] = {name.removeprefix("service:"): secs
                               for name, secs in sorted(seconds.items())}
    return report


__all__ = ["DEGRADED", "DOWN", "UP", "Part", "app_kind", "assess_app", "assess_apps",
           "assess_deployment", "assess_ingress", "assess_ray", "exit_code", "not_up",
           "platform_health", "probe_http", "probe_listening", "probe_postgres", "probe_redis",
           "recorded_apps", "run_concurrently", "service_probe", "summarize"]
