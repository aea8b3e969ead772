"""Losing the head of an ``--ha`` platform (the session's: GCS state in Redis, a node
supervisor, Serve proxies on the workers behind the platform's ingress) while clients send
non-streaming chat requests: KubeRay's GCS fault-tolerance bar, zero failed requests. After it,
what existed before is still there: the Serve app, a detached actor, a finished job and the
registered model. Then `rayplane status` names a dead head and `rayplane up` restores it (and
Serve applications that went missing).

Each test is bounded (requests for as long as the recovery takes, at most RECOVERY_S) and
prints one line: requests sent, failed, seconds to recover."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest
from openai import OpenAI

from tests.integration.test_train_fit import job_status
from tests.support import tiny_model as tm
from tests.support.platform import ray_job_submit, rayplane

REGISTERED, APP, PREFIX = "ha-tiny", "ha-tests", "/ha-tests"
#: The replica lives on a worker node: the head (the local CPU pool) is what gets killed.
POOL = "a100-timeslice"
RECOVERY_S = 240
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def serve_details(cluster) -> dict:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(cluster.dashboard_url,
                                 headers=cluster.auth_headers()).get_serve_details()


def head_node_id(cluster) -> str | None:
    try:
        return next((n["node_id"] for n in cluster.alive_nodes() if n.get("is_head_node")),
                    None)
    except Exception:  # noqa: BLE001 - the dashboard is down with the head
        return None


@pytest.fixture(scope="module")
def ha_app(local_cluster, cluster_env, tmp_path_factory):
    """The tiny model on a worker pool, its replica answering HTTP itself (ingress direct), and
    what must survive the head: a finished job and a detached actor."""
    version = tm.register_model(tm.cached_tiny_model("1"), REGISTERED,
                                tracking_uri=local_cluster.mlflow_uri)
    cfg = tmp_path_factory.mktemp("ha") / "serve.yaml"
    cfg.write_text(tm.serve_config_yaml(name=APP, source=f"models:/{REGISTERED}@champion",
                                        pool=POOL, route_prefix=PREFIX, ingress_mode="direct",
                                        api_key_file=local_cluster.api_key_path))
    out = rayplane(cluster_env, "serve", "up", str(cfg))
    assert out.returncode == 0, out.stderr + out.stdout
    job = f"before-the-fault-{uuid.uuid4().hex[:6]}"
    actor = f"counter-{uuid.uuid4().hex[:6]}"
    for entrypoint, sid in ((("python", "-c", "print('ran before the fault')"), job),
                            (("python", "-m", "tests.reliability.detached_actor", "create",
                              actor, POOL), None)):
        extra = ("--submission-id", sid) if sid else ()
        res = ray_job_submit(cluster_env, *entrypoint, extra=extra, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    yield {"job": job, "actor": actor, "version": version}
    rayplane(cluster_env, "serve", "down", APP, timeout=120)


class Load:
    """Two clients sending non-streaming chat requests back to back (no client retries: a
    failure is a failure) until stopped."""

    def __init__(self, cluster, threads: int = 2):
        self.client = OpenAI(base_url=f"{cluster.serve_url}{PREFIX}/v1", max_retries=0,
                             timeout=60, api_key=cluster.api_key_path.read_text().strip())
        self.sent = self.ok = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.client.chat.completions.create(
                    model="tiny-chat", messages=tm.GREETING, temperature=0,
                    max_tokens=60).choices[0].message.content
                error = None if text == tm.GREETING_REPLY else f"wrong text {text!r}"
            except Exception as err:  # noqa: BLE001 - every failure counts, whatever it is
                error = f"{type(err).__name__}: {str(err)[:200]}"
            with self.lock:
                self.sent += 1
                self.ok += error is None
                if error:
                    self.errors.append(error)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 60
        while self.ok < 10:
            assert time.monotonic() < deadline and not self.errors, self.errors[:3]
            time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def kill_gcs_server(cluster) -> None:
    head = next(p for p in cluster.state().processes if p.name.startswith("ray-head"))
    pids = subprocess.run(["pgrep", "-g", str(head.pid), "-x", "gcs_server"],
                          capture_output=True, text=True, check=False).stdout.split()
    assert pids, "no gcs_server in the head's process group"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


def wait_recovered(cluster, old_head: str, started: float) -> float:
    """Seconds from ``started`` until a new head has joined and the app is RUNNING again."""
    while time.monotonic() - started < RECOVERY_S:
        head = head_node_id(cluster)
        if head and head != old_head:
            try:
                if serve_details(cluster)["applications"][APP]["status"] == "RUNNING":
                    return time.monotonic() - started
            except Exception:  # noqa: BLE001 - the new head's dashboard is still starting
                pass
        time.sleep(0.5)
    pytest.fail(f"the head was not back within {RECOVERY_S}s; see "
                f"{cluster.logs_dir / 'supervisor.log'}")


@pytest.mark.parametrize("fault", ["gcs_server", "whole head"])
def test_losing_the_head_costs_no_request_and_keeps_the_cluster(fault, local_cluster,
                                                                cluster_env, ha_app):
    old_head = head_node_id(local_cluster)
    assert old_head
    with Load(local_cluster) as load:
        started = time.monotonic()
        if fault == "gcs_server":
            kill_gcs_server(local_cluster)
        else:
            local_cluster.kill_node(local_cluster.catalog.head_pool.name)
        recovered = wait_recovered(local_cluster, old_head, started)
        sent_at_recovery = load.sent
        time.sleep(5)  # and it keeps answering after
    print(f"\n[head fault: {fault}] requests sent={load.sent} failed={len(load.errors)} "
          f"recovered_s={recovered:.1f} (sent until recovery: {sent_at_recovery})")
    assert not load.errors, load.errors[:5]
    assert load.sent > sent_at_recovery

    # What existed before the fault is all still there.
    assert job_status(local_cluster, ha_app["job"]) == "SUCCEEDED"
    res = ray_job_submit(cluster_env, "python", "-m", "tests.reliability.detached_actor",
                         "check", ha_app["actor"], timeout=300)
    assert res.returncode == 0 and "count=" in res.stdout, res.stdout[-2000:] + res.stderr
    from mlflow import MlflowClient

    version = MlflowClient(local_cluster.mlflow_uri).get_model_version_by_alias(REGISTERED,
                                                                                "champion")
    assert version.version == str(ha_app["version"])
    assert serve_details(local_cluster)["applications"][APP]["status"] == "RUNNING"


def test_status_names_a_dead_head_and_up_brings_it_and_lost_apps_back(local_cluster,
                                                                      cluster_env, ha_app):
    st = local_cluster.state()
    supervisor = next(p for p in st.processes if p.name == "supervisor")
    # Without its supervisor the head stays dead: what `rayplane status` must then say.
    os.killpg(supervisor.pid, signal.SIGKILL)
    local_cluster.kill_node(local_cluster.catalog.head_pool.name)
    out = rayplane(cluster_env, "status", "--json", timeout=60)
    assert out.returncode != 0, out.stdout
    report = json.loads(out.stdout)
    dead = {name: p for name, p in report["health"]["parts"].items() if p["status"] != "up"}
    assert dead.get("ray", {}).get("status") == "down", report["health"]
    assert "supervisor" in dead, report["health"]

    started = time.monotonic()
    out = rayplane(cluster_env, "up", timeout=RECOVERY_S + 60)
    assert out.returncode == 0, out.stdout + out.stderr
    up_s = time.monotonic() - started
    out = rayplane(cluster_env, "status", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr

    # An application Serve lost (removed behind rayplane's back) comes back with `up`.
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    serve_client = ServeSubmissionClient(local_cluster.dashboard_url,
                                         headers=local_cluster.auth_headers())
    details = serve_client.get_serve_details()
    others = [d["deployed_app_config"] for n, d in details["applications"].items() if n != APP]
    serve_client.deploy_applications({"proxy_location": details["proxy_location"],
                                      "http_options": details["http_options"],
                                      "applications": others})
    deadline = time.monotonic() + 120
    while APP in (serve_details(local_cluster).get("applications") or {}):
        assert time.monotonic() < deadline, "the app was not removed"
        time.sleep(1)
    out = rayplane(cluster_env, "up", timeout=420)
    assert out.returncode == 0 and APP in out.stdout, out.stdout + out.stderr
    client = OpenAI(base_url=f"{local_cluster.serve_url}{PREFIX}/v1", max_retries=2,
                    api_key=local_cluster.api_key_path.read_text().strip())
    text = client.chat.completions.create(model="tiny-chat", messages=tm.GREETING,
                                          temperature=0, max_tokens=60).choices[0].message.content
    assert text == tm.GREETING_REPLY
    print(f"\n[status and up] head and supervisor back after `rayplane up` in {up_s:.1f}s; "
          f"lost app {APP} restored")
    assert job_status(local_cluster, ha_app["job"]) == "SUCCEEDED"
