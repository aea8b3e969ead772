"""``rayplane status``'s health report: Ray's Serve statuses mapped to up/degraded/down, the
exit code, and the probes against real servers on loopback standing in for the platform's
parts (an HTTP server for the dashboard, MLflow, the Serve ingress and the agents app; a socket
that accepts and never answers for a hung part; a real redis-server for Redis). The report on
the real platform: tests/integration/test_status_health.py."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raycluster.cli import build_app
from raycluster.local import LocalState, ManagedProcess, free_port
from raycluster.local.health import (
    AGENTS_API_IMPORT,
    AGENTS_MCP_IMPORT,
    DEGRADED,
    DOWN,
    UP,
    Part,
    assess_app,
    assess_apps,
    assess_ingress,
    assess_ray,
    exit_code,
    platform_health,
    probe_http,
    probe_postgres,
    probe_redis,
    run_concurrently,
    summarize,
)

PLAN = [{"pool": "cpu", "role": "head"}, {"pool": "a100-mig", "role": "worker"},
        {"pool": "h100", "role": "worker"}]


def node(pool: str, head: bool = False, state: str = "ALIVE") -> dict:
    return {"node_id": secrets.token_hex(28), "state": state, "is_head_node": head,
            "labels": {"rayplane.io/pool": pool}, "resources_total": {"CPU": 2.0}}


def deployment(status: str, running: int, target: int, message: str = "") -> dict:
    return {"status": status, "status_trigger": "CONFIG_UPDATE_COMPLETED", "message": message,
            "target_num_replicas": target,
            "replicas": [{"state": "RUNNING"}] * running + [{"state": "STARTING"}]}


def app(status: str, *deployments: dict, import_path: str = "serve.app:build",
        route: str = "/openai", message: str = "") -> dict:
    return {"status": status, "message": message, "route_prefix": route,
            "deployed_app_config": {"import_path": import_path},
            "deployments": {f"d{i}": d for i, d in enumerate(deployments)}}


# -- Ray's statuses -> up / degraded / down ------------------------------------------------------


@pytest.mark.parametrize(("ray_app", "expected"), [
    (app("RUNNING", deployment("HEALTHY", 1, 1)), UP),
    (app("RUNNING", deployment("HEALTHY", 2, 2), deployment("UPSCALING", 1, 2)), UP),
    (app("RUNNING", deployment("DOWNSCALING", 2, 1)), UP),
    (app("RUNNING", deployment("HEALTHY", 0, 0)), UP),  # scaled to zero
    (app("RUNNING", deployment("HEALTHY", 1, 2)), DEGRADED),  # a replica short
    (app("RUNNING", deployment("HEALTHY", 0, 1)), DOWN),  # none left
    (app("DEPLOYING", deployment("UPDATING", 0, 1)), DEGRADED),
    (app("DEPLOYING", deployment("UPSCALING", 0, 1)), DEGRADED),
    (app("DEPLOYING", deployment("HEALTHY", 1, 1)), DEGRADED),
    (app("UNHEALTHY", deployment("UNHEALTHY", 1, 2)), DEGRADED),
    (app("UNHEALTHY", deployment("UNHEALTHY", 0, 1)), DOWN),
    (app("DEPLOY_FAILED", deployment("DEPLOY_FAILED", 0, 1)), DOWN),
    (app("DEPLOY_FAILED"), DOWN),
    (app("DELETING", deployment("HEALTHY", 1, 1)), DEGRADED),
    (app("NOT_STARTED"), DEGRADED),
])
def test_serve_application_statuses_map_to_up_degraded_down(ray_app: dict, expected: str):
    part = assess_app("openai", ray_app)
    assert (part.name, part.status) == ("serve:openai", expected), part
    assert part.reason.startswith(ray_app["status"])
    assert part.details["ray_status"] == ray_app["status"]


def test_an_application_says_which_deployment_failed_and_why():
    trace = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n"
    part = assess_app("openai", app("DEPLOY_FAILED", deployment("HEALTHY", 1, 1),
                                    deployment("DEPLOY_FAILED", 0, 1, message=trace)))
    assert part.status == DOWN
    assert part.reason == ("DEPLOY_FAILED: d1 DEPLOY_FAILED 0/1 replicas: RuntimeError: CUDA "
                           "out of memory")
    assert part.details["deployments"]["d0"] == {"status": "HEALTHY", "running_replicas": 1,
                                                 "target_replicas": 1}


def test_the_agents_app_is_named_as_such_and_its_http_probe_counts():
    ok = Part("agents:agents", UP, "answered", "http://127.0.0.1:1/agents/ok")
    api = app("RUNNING", deployment("HEALTHY", 1, 1), import_path=AGENTS_API_IMPORT,
              route="/agents")
    part = assess_app("agents", api, ok)
    assert (part.name, part.status, part.url) == ("agents:agents", UP, ok.url)
    mcp = assess_app("agents-mcp", app("RUNNING", deployment("HEALTHY", 1, 1),
                                       import_path=AGENTS_MCP_IMPORT, route="/mcp"))
    assert (mcp.name, mcp.status) == ("agents:agents-mcp", UP)
    # Ray says RUNNING, but the app does not answer: down, saying both.
    dead = Part("agents:agents", DOWN, "no answer at http://127.0.0.1:1/agents/ok: timed out")
    part = assess_app("agents", api, dead)
    assert part.status == DOWN
    assert part.reason == f"Ray says RUNNING, but {dead.reason}"


def test_the_builders_named_here_are_the_agents_apps():
    from agents.serve_app import API_IMPORT_PATH, MCP_IMPORT_PATH

    assert (AGENTS_API_IMPORT, AGENTS_MCP_IMPORT) == (API_IMPORT_PATH, MCP_IMPORT_PATH)


def test_ray_head_missing_is_down_and_a_worker_missing_is_degraded():
    url = "http://127.0.0.1:1"
    everyone = [node("cpu", head=True), node("a100-mig"), node("h100")]
    assert assess_ray(PLAN, everyone, url).status == UP
    assert len(assess_ray(PLAN, everyone, url).details["nodes"]) == 3
    worker_gone = [everyone[0], everyone[1], node("h100", state="DEAD")]
    part = assess_ray(PLAN, worker_gone, url)
    assert (part.status, part.reason) == (DEGRADED, "worker node of pool h100 not alive "
                                                    "(2 of 3 nodes)")
    part = assess_ray(PLAN, everyone[1:], url)
    assert (part.status, part.reason) == (DOWN, "the head node (pool cpu) is not alive")
    part = assess_ray(PLAN, ConnectionRefusedError(), url)
    assert (part.status, part.reason) == (DOWN, f"the Ray dashboard at {url} did not answer: "
                                                "connection refused")


def test_serve_ingress_is_reported_only_when_serve_runs():
    healthz = Part("serve", UP, "answered", "http://127.0.0.1:1/-/healthz")
    empty = {"controller_info": {}, "proxies": {}, "applications": {}}
    assert assess_ingress(empty, healthz) is None
    running = {"controller_info": {"node_id": "n"}, "applications": {"a": {}},
               "proxies": {"n1": {"status": "HEALTHY"}, "n2": {"status": "UNHEALTHY"}}}
    part = assess_ingress(running, healthz)
    assert (part.status, part.reason) == (DEGRADED, "answered; proxies UNHEALTHY")
    starting = {**running, "proxies": {"n1": {"status": "HEALTHY"}, "n2": {"status": "STARTING"},
                                       "n3": {"status": "DRAINING"}}}
    assert assess_ingress(starting, healthz).status == UP  # Serve at work, not unhealthy
    refused = Part("serve", DOWN, "no answer at http://127.0.0.1:1/-/healthz: connection refused")
    assert assess_ingress(running, refused).status == DOWN
    # the dashboard cannot say: the ingress's own answer decides
    assert assess_ingress(TimeoutError(), healthz).status == DEGRADED
    assert assess_ingress(TimeoutError(), refused).status == DOWN


def test_an_application_deployed_through_rayplane_that_serve_lost_is_down():
    recorded = {"openai": "serve.app:build", "agents": AGENTS_API_IMPORT}
    running = {"controller_info": {"node_id": "n"},
               "applications": {"openai": app("RUNNING", deployment("HEALTHY", 1, 1))}}
    parts = assess_apps(running, recorded, {})
    assert [(p.name, p.status) for p in parts] == [("serve:openai", UP), ("agents:agents", DOWN)]
    assert parts[1].reason == ("deployed through rayplane, but Serve does not run it (lost with "
                               "the head?); `rayplane up` deploys it again")
    # Serve gone altogether (a head lost without --ha): its ingress is reported too.
    empty = {"controller_info": {}, "proxies": {}, "applications": {}}
    healthz = Part("serve", DOWN, "http://127.0.0.1:1/-/healthz answered HTTP 503")
    assert assess_ingress(empty, healthz) is None
    assert assess_ingress(empty, healthz, expected=True).status == DOWN
    assert [p.status for p in assess_apps(empty, recorded, {})] == [DOWN, DOWN]


def test_overall_status_and_exit_code():
    up = [Part("ray", UP, "ok"), Part("mlflow", UP, "ok")]
    assert (summarize(up)["status"], exit_code(summarize(up))) == (UP, 0)
    assert summarize(up)["reason"] == "all 2 parts up"
    sick = [*up, Part("serve:openai", DEGRADED, "x"), Part("postgres", DOWN, "y")]
    report = summarize(sick)
    assert (report["status"], exit_code(report)) == (DOWN, 1)
    assert report["reason"] == "serve:openai degraded, postgres down"
    assert report["parts"]["postgres"] == {"status": DOWN, "reason": "y"}
    assert exit_code(summarize([Part("ray", DEGRADED, "z")])) == 1
    assert exit_code(summarize([])) == 1


# -- probes against real loopback servers --------------------------------------------------------


class StandIn(ThreadingHTTPServer):
    """One loopback HTTP server standing in for the dashboard (token required), MLflow, the
    Serve ingress and the agents app: ``routes`` maps a path to (status, JSON or text)."""

    daemon_threads = True

    def __init__(self, token: str):
        self.token = token
        self.routes: dict[str, tuple[int, object]] = {}
        self.delays: dict[str, float] = {}  # path -> seconds before it answers
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path
        if path.startswith("/api/") and self.headers.get("Authorization") != \
                f"Bearer {self.server.token}":
            code, body = 401, "Unauthorized"
        else:
            code, body = self.server.routes.get(path, (404, "not found"))
        time.sleep(self.server.delays.get(path, 0))
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


#: HAProxy's answer when no Serve proxy behind it passes its check.
HAPROXY_503 = ("<html><body><h1>503 Service Unavailable</h1>\nNo server is available to handle "
               "this request.\n</body></html>\n")


@pytest.fixture
def hung_port():
    """A port that accepts connections and never answers."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def test_http_probe_up_down_and_timeout(hung_port):
    server = StandIn("t")
    server.routes = {"/health": (200, "OK"), "/bad": (503, "draining\nProxy is draining"),
                     "/-/healthz": (503, HAPROXY_503)}
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert probe_http("mlflow", f"{base}/health").status == UP
        bad = probe_http("mlflow", f"{base}/bad")
        assert (bad.status, bad.reason) == (DOWN, f"{base}/bad answered HTTP 503: Proxy is "
                                                  "draining")
        assert probe_http("serve", f"{base}/-/healthz").reason == (
            f"{base}/-/healthz answered HTTP 503: No server is available to handle this request.")
    finally:
        server.shutdown()
        server.server_close()
    refused = probe_http("mlflow", f"{base}/health")
    assert (refused.status, refused.reason) == (DOWN, f"no answer at {base}/health: "
                                                      "connection refused")
    start = time.monotonic()
    hung = probe_http("mlflow", f"http://127.0.0.1:{hung_port}/health", timeout=0.5)
    assert time.monotonic() - start < 2
    assert (hung.status, hung.reason) == (DOWN, f"no answer at http://127.0.0.1:{hung_port}"
                                                "/health: timed out")


def test_probes_run_at_once_and_a_hung_one_is_cut_at_the_deadline():
    start = time.monotonic()
    found = run_concurrently({"a": lambda: time.sleep(1) or "a", "b": lambda: time.sleep(1) or "b",
                              "hung": lambda: time.sleep(30), "err": lambda: 1 / 0},
                             deadline=1.5)
    took = time.monotonic() - start
    # a and b (1 s each) both finish within the 1.5 s deadline only when run at once; the hung
    # probe (30 s) is cut at the deadline, not waited for. No tight upper bound: the machine
    # may be loaded.
    assert took < 10, took
    assert (found["a"], found["b"]) == ("a", "b")
    assert isinstance(found["hung"], TimeoutError)
    assert isinstance(found["err"], ZeroDivisionError)


def test_postgres_probe_times_out_on_a_server_that_never_answers(hung_port):
    start = time.monotonic()
    part = probe_postgres("postgres", f"postgresql://u:p@127.0.0.1:{hung_port}/agents",
                          f"127.0.0.1:{hung_port}/agents")
    assert time.monotonic() - start < 4
    assert part.status == DOWN and "timeout" in part.reason, part
    part = probe_postgres("postgres", f"postgresql://u:p@127.0.0.1:{free_port()}/agents", "x")
    assert part.status == DOWN and "refused" in part.reason, part


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed "
                    "(make system-deps)")
def test_redis_probe_pings_with_the_password(tmp_path, hung_port):
    port, password = free_port(), secrets.token_urlsafe(16)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", password, "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        good, wrong = tmp_path / "pw", tmp_path / "wrong"
        good.write_text(password)
        wrong.write_text("not-it")
        deadline = time.monotonic() + 20
        while (part := probe_redis("redis", port, good)).status != UP:
            assert time.monotonic() < deadline, part
            time.sleep(0.2)
        assert part.reason.startswith("PING answered in")
        refused = probe_redis("redis", port, wrong)
        assert refused.status == DOWN and "password" in refused.reason.lower(), refused
        assert password not in refused.reason
        hung = probe_redis("redis", hung_port, good, timeout=0.5)
        assert (hung.status, hung.reason) == (DOWN, f"no answer at 127.0.0.1:{hung_port}: "
                                                    "timed out")
    finally:
        proc.terminate()
        proc.wait(10)


# -- the whole report and `rayplane status`, on stand-ins ----------------------------------------


@pytest.fixture
def platform(tmp_path, hung_port):
    """A state folder whose platform is the stand-in server (dashboard, MLflow, Serve), with
    real processes recorded as its head and MLflow, and PostgreSQL on the hung port."""
    token = secrets.token_hex(16)
    (tmp_path / "auth_token").write_text(token)
    (tmp_path / "api_key").write_text("rp-key")
    server = StandIn(token)
    nodes = [node("cpu", head=True), node("a100-mig"), node("h100")]
    ok_app = app("RUNNING", deployment("HEALTHY", 1, 1), import_path=AGENTS_API_IMPORT,
                 route="/agents")
    server.routes = {
        "/api/v0/nodes?limit=100&detail=true": (200, {"data": {"result": {"result": nodes}}}),
        "/api/serve/applications/": (200, {"controller_info": {"node_id": "n"},
                                           "proxies": {"n": {"status": "HEALTHY"}},
                                           "applications": {"agents": ok_app}}),
        "/-/healthz": (200, "success"), "/agents/ok": (200, {"ok": True}),
        "/health": (200, "OK"),
    }
    sleepers = {name: subprocess.Popen(["sleep", "120"], start_new_session=True)
                for name in ("ray-head-cpu", "mlflow")}
    ports = {"dashboard": server.port, "mlflow": server.port, "serve": server.port,
             "postgres": hung_port}
    LocalState(state_dir=str(tmp_path), ports=ports, temp_dir=str(tmp_path / "tmp"),
               nodes=PLAN, processes=[ManagedProcess(name, p.pid, ["sleep", "120"], "")
                                      for name, p in sleepers.items()]).save()
    try:
        yield tmp_path, server, sleepers
    finally:
        server.shutdown()
        server.server_close()
        for p in sleepers.values():
            p.kill()
            p.wait()


def status(state_dir: Path, *args: str):
    return CliRunner().invoke(build_app(), ["status", "--state-dir", str(state_dir), *args])


def test_status_exits_0_when_every_part_is_up_and_1_naming_the_dead_one(platform):
    from raycluster.local import LocalCluster

    state_dir, server, sleepers = platform
    healthy = platform_health(LocalCluster.attach(state_dir))
    assert healthy["status"] == UP, healthy
    assert list(healthy["parts"]) == ["ray", "serve", "agents:agents", "mlflow"]
    assert healthy["parts"]["agents:agents"]["url"].endswith("/agents/ok")
    out = status(state_dir)
    assert out.exit_code == 0, out.output
    assert "agents:agents" in out.output and "Agents API" in out.output
    as_json = status(state_dir, "--json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.output)["health"]["parts"]["mlflow"]["status"] == UP

    server.routes["/health"] = (503, "[bold]Service Unavailable[/]")  # not markup: shown as is
    out = status(state_dir)
    assert out.exit_code == 1
    assert "answered HTTP 503: [bold]Service Unavailable[/]" in out.output
    assert "rayplane is down: mlflow down" in out.output
    assert "MLflow UI       down:" in out.output
    sleepers["mlflow"].kill()
    sleepers["mlflow"].wait()
    info = json.loads(status(state_dir, "--json").output)
    assert info["health"]["parts"]["mlflow"]["reason"].endswith(
        f"its process (pid {sleepers['mlflow'].pid}) has exited")


def test_a_hung_part_is_down_and_the_report_stays_short(platform):
    from raycluster.local import LocalCluster

    state_dir, server, _ = platform
    st = LocalState.load(state_dir)
    # PostgreSQL and Redis (``--ha``) on the port that never answers; the node supervisor
    # (no port) is up while its process runs.
    for name in ("postgres", "redis", "supervisor"):
        st.processes.append(ManagedProcess(name, st.processes[0].pid, ["sleep"], ""))
    st.ports["redis"] = st.ports["postgres"]
    st.save()
    (state_dir / "redis_password").write_text("pw")
    (state_dir / "postgres_dsn").write_text(
        f"postgresql://rayplane:x@127.0.0.1:{st.ports['postgres']}/agents")
    server.routes["/agents/ok"] = (503, "no replica")
    (state_dir / "serve-applied.json").write_text(json.dumps({"applications": [
        {"name": "agents", "import_path": AGENTS_API_IMPORT},
        {"name": "openai", "import_path": "serve.app:build"}]}))
    start = time.monotonic()
    report = platform_health(LocalCluster.attach(state_dir))
    assert time.monotonic() - start < 5
    assert report["status"] == DOWN
    assert report["parts"]["postgres"]["status"] == DOWN
    assert "timeout" in report["parts"]["postgres"]["reason"]
    assert report["parts"]["redis"] == {"status": DOWN, "reason": "no answer at 127.0.0.1:"
                                        f"{st.ports['redis']}: timed out"}
    assert report["parts"]["supervisor"] == {"status": UP, "reason": "running"}
    assert report["parts"]["agents:agents"]["reason"].startswith("Ray says RUNNING, but")
    assert report["parts"]["serve:openai"]["status"] == DOWN  # recorded, not running


def test_status_of_a_platform_that_is_not_up_exits_1(tmp_path):
    out = status(tmp_path)
    assert out.exit_code == 1 and "rayplane is not up" in out.output
    out = status(tmp_path, "--json")
    assert out.exit_code == 1
    assert json.loads(out.output)["health"] == {"status": DOWN, "reason": "rayplane is not up",
                                                "parts": {}}


def test_a_slow_first_serve_details_call_still_makes_the_report(platform):
    """The dashboard's first Serve call starts a Ray driver in it (1.6 s measured on an idle
    platform): the serve details get most of the deadline, more than the other probes."""
    from raycluster.local import LocalCluster

    state_dir, server, _ = platform
    server.delays["/api/serve/applications/"] = 3.2
    start = time.monotonic()
    report = platform_health(LocalCluster.attach(state_dir))
    assert time.monotonic() - start < 4.6
    assert report["status"] == UP, report
    assert report["probe_seconds"]["serve"] >= 3.2
