"""The local platform: token auth on the Jobs API, placement on every pool, status for
scripts, idempotent up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from raycluster.catalog import load_catalog
from raycluster.local import LocalCluster, LocalState, free_port, port_is_free
from raycluster.local.processes import children
from tests.integration.conftest import drop_postgres_data, ray_job_submit

POOLS = [p.name for p in load_catalog().pools]


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_every_pool_has_its_node_with_the_catalog_resources(local_cluster: LocalCluster):
    nodes = local_cluster.alive_nodes()
    by_pool = {n["labels"]["rayplane.io/pool"]: n for n in nodes}
    assert sorted(by_pool) == sorted(POOLS)
    catalog = load_catalog()
    for pool in catalog.gpu_pools:
        total = by_pool[pool.name]["resources_total"]
        # the same resource name its KubeRay worker group advertises, times the local workers
        assert total[pool.ray_resource] == pool.ray_resources(local_cluster.workers_per_pool)[
            pool.ray_resource]
        assert total.get("CPU", 0) == 0, "GPU-pool nodes leave the cores to the head"
        assert "GPU" not in total
    import os

    assert by_pool["cpu"]["resources_total"]["CPU"] == os.cpu_count()


def test_unauthenticated_job_submission_is_refused_and_never_runs(local_cluster, tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    status, body = http("POST", f"{local_cluster.dashboard_url}/api/jobs/",
                        {"entrypoint": f"touch {marker}"})
    assert status == 401, body
    status, _ = http("POST", f"{local_cluster.dashboard_url}/api/jobs/",
                     {"entrypoint": f"touch {marker}"},
                     headers={"Authorization": "Bearer not-the-token"})
    assert status in (401, 403)
    # listing jobs needs the token too
    assert http("GET", f"{local_cluster.dashboard_url}/api/jobs/")[0] == 401

    # with the token, a job runs
    status, job = http("POST", f"{local_cluster.dashboard_url}/api/jobs/",
                       {"entrypoint": f"touch {marker}.ok"}, headers=local_cluster.auth_headers())
    assert status == 200, job
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not Path(f"{marker}.ok").exists():
        time.sleep(1)
    assert Path(f"{marker}.ok").exists(), "the authenticated job ran"
    assert not marker.exists(), "the unauthenticated job never ran"
    _, jobs = http("GET", f"{local_cluster.dashboard_url}/api/jobs/",
                   headers=local_cluster.auth_headers())
    assert not any(str(marker) + " " in j["entrypoint"] + " " for j in jobs)


def test_ray_job_submit_without_the_token_fails(local_cluster, cluster_env):
    env = {k: v for k, v in cluster_env.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(Path(local_cluster.state_dir) / "no-home")  # no ~/.ray/auth_token
    res = ray_job_submit(env, "echo", "should-not-run", timeout=120)
    assert res.returncode != 0
    assert "auth" in (res.stdout + res.stderr).lower()


@pytest.mark.parametrize("pool", POOLS)
def test_a_job_asking_for_a_pool_runs_on_that_pools_node(local_cluster, cluster_env, pool):
    resource = load_catalog().pool(pool).ray_resource
    res = ray_job_submit(cluster_env, "python", "-m", "raycluster.smoke", "--pool", pool,
                         resources={resource: 1}, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    line = next(l for l in out.splitlines() if "RAYPLANE_SMOKE" in l)
    result = json.loads(line.split("RAYPLANE_SMOKE", 1)[1])
    assert result == {**result, "pool": pool, "entrypoint_pool": pool, "task_pool": pool,
                      "ok": True}


def test_status_json_for_scripts(local_cluster):
    res = subprocess.run([sys.executable, "-m", "raycluster", "status", "--json",
                          "--state-dir", str(local_cluster.state_dir)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["up"] is True
    assert info["dashboard"] == local_cluster.dashboard_url
    assert info["mlflow"] == local_cluster.mlflow_uri
    assert info["serve"] == local_cluster.serve_url and info["agents"]
    assert Path(info["token_file"]).read_text().strip()
    assert oct(Path(info["token_file"]).stat().st_mode & 0o777) == "0o600"
    assert Path(info["api_key_file"]).exists()
    assert sorted(n["pool"] for n in info["nodes"]) == sorted(POOLS)
    # the MLflow server answers
    with urllib.request.urlopen(f"{info['mlflow']}/health", timeout=10) as resp:
        assert resp.status == 200
    # PostgreSQL is one of the platform's processes; its DSN shows without the password
    port = local_cluster.ports["postgres"]
    assert info["postgres"] == f"postgresql://rayplane:***@127.0.0.1:{port}/agents"
    assert {"name": "postgres", "alive": True}.items() <= next(
        p for p in info["processes"] if p["name"] == "postgres").items()
    assert oct(Path(info["postgres_dsn_file"]).stat().st_mode & 0o777) == "0o600"
    text = subprocess.run([sys.executable, "-m", "raycluster", "status", "--state-dir",
                           str(local_cluster.state_dir)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert text.returncode == 0, text.stderr
    assert f"PostgreSQL      127.0.0.1:{port}" in text.stdout
    assert local_cluster.postgres.password() not in text.stdout + res.stdout


def test_up_is_idempotent(local_cluster):
    before = [p.pid for p in local_cluster.state().processes]
    again = LocalCluster(state_dir=local_cluster.state_dir, ports=local_cluster.ports)
    st = again.up()
    assert [p.pid for p in st.processes] == before


def start_postgres_alone(state_dir: Path) -> LocalCluster:
    """The platform's PostgreSQL, as `rayplane up` starts it, without a second Ray cluster."""
    cluster = LocalCluster(state_dir=state_dir, ports={"postgres": free_port()})
    cluster.logs_dir.mkdir(parents=True, exist_ok=True)
    proc = cluster._spawn_postgres(cluster.postgres.prepare(cluster.logs_dir))
    LocalState(state_dir=str(cluster.state_dir), ports=cluster.ports,
               temp_dir=str(state_dir / "tmp"), processes=[proc]).save()
    cluster.postgres.wait_ready(120, [proc], cluster.logs_dir)
    return cluster


def test_rayplane_down_stops_postgresql_and_its_data_stays_for_the_next_up(tmp_path):
    import psycopg

    cluster = start_postgres_alone(tmp_path / "state")
    leader = cluster.state().processes[0]
    workers = children(leader.pid)
    assert workers, "PostgreSQL's checkpointer, WAL writer, ... (sessions of their own)"
    with psycopg.connect(cluster.postgres.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (note text)")
        conn.execute("INSERT INTO kept VALUES ('survives down')")

    res = subprocess.run([sys.executable, "-m", "raycluster", "down", "--state-dir",
                          str(cluster.state_dir)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "stopped: postgres" in res.stdout
    assert not leader.alive()
    assert not [pid for pid, _ in workers if Path(f"/proc/{pid}").exists()]
    assert port_is_free(cluster.ports["postgres"])
    assert not cluster.postgres.socket_dir.exists()

    again = start_postgres_alone(tmp_path / "state")  # the same data folder, no new initdb
    try:
        with psycopg.connect(again.postgres.dsn()) as conn:
            assert conn.execute("SELECT note FROM kept").fetchall() == [("survives down",)]
    finally:
        assert again.down() == ["postgres"]
        drop_postgres_data(again.state_dir)
