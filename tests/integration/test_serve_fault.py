"""A model replica killed while clients send requests: every request succeeds or gets a
retryable error (503 / a stream error saying to retry), none hangs, and Serve brings the
deployment back to its replica count within a bound."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import openai
import pytest
from openai import OpenAI

from tests.integration.conftest import rayplane
from tests.support import tiny_model as tm

REGISTERED = "serve-fault-tiny"
APP, PREFIX, DEPLOYMENT = "fault-tests", "/fault-tests", "model-tiny-chat"
pytestmark = pytest.mark.timeout(900)


def serve_details(local_cluster) -> dict:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(local_cluster.dashboard_url,
                                 headers=local_cluster.auth_headers()).get_serve_details()


def replicas(local_cluster) -> list[dict]:
    app = serve_details(local_cluster)["applications"].get(APP) or {}
    return (app.get("deployments") or {}).get(DEPLOYMENT, {}).get("replicas", [])


@pytest.mark.slow
def test_killed_replica_costs_no_request_and_recovers(local_cluster, cluster_env, tmp_path,
                                                      record_property):
    tm.register_model(tm.cached_tiny_model("1"), REGISTERED,
                      tracking_uri=local_cluster.mlflow_uri)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(tm.serve_config_yaml(name=APP, source=f"models:/{REGISTERED}@champion",
                                        pool="h100-timeslice", route_prefix=PREFIX,
                                        api_key_file=local_cluster.api_key_path,
                                        min_replicas=2, max_replicas=2))
    try:
        out = rayplane(cluster_env, "serve", "up", str(cfg))
        assert out.returncode == 0, out.stderr + out.stdout
        running = [r for r in replicas(local_cluster) if r["state"] == "RUNNING"]
        assert len(running) == 2
        victim = running[0]

        client = OpenAI(base_url=f"{local_cluster.serve_url}{PREFIX}/v1", timeout=60,
                        max_retries=2, api_key=local_cluster.api_key_path.read_text().strip())
        outcomes: list[str] = []
        lock = threading.Lock()
        started = threading.Event()

        def one(i: int) -> None:
            kw = {"model": "tiny-chat", "messages": tm.GREETING, "temperature": 0, "max_tokens": 60}
            try:
                if i % 2:
                    text = "".join(c.choices[0].delta.content or "" for c in
                                   client.chat.completions.create(stream=True, **kw)
                                   if c.choices)
                else:
                    text = client.chat.completions.create(**kw).choices[0].message.content
                result = "ok" if text == tm.GREETING_REPLY else f"wrong text {text!r}"
            except openai.APIStatusError as err:  # after the client's own retries
                result = "retryable" if err.status_code == 503 and \
                    err.response.headers.get("retry-after") else f"status {err.status_code}"
            except openai.APITimeoutError:
                result = "hung"
            except openai.APIError as err:  # an error event inside a started stream
                code = (err.body or {}).get("code") if isinstance(err.body, dict) else None
                result = "retryable" if code == "replica_unavailable" else f"error {err!r}"
            with lock:
                outcomes.append(result)
                if len(outcomes) >= 4:
                    started.set()

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, i) for i in range(36)]
            assert started.wait(120), "no request finished before the kill"
            os.kill(victim["pid"], signal.SIGKILL)  # the replica process this test deployed
            killed = time.monotonic()
            _, pending = wait(futures, timeout=300)
            assert not pending, f"{len(pending)} requests hung"
        assert len(outcomes) == 36
        bad = [o for o in outcomes if o not in ("ok", "retryable")]
        assert not bad, bad
        assert outcomes.count("ok") >= 30  # retries land on the surviving replica

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            now = [r for r in replicas(local_cluster) if r["state"] == "RUNNING"]
            if len(now) == 2 and victim["replica_id"] not in {r["replica_id"] for r in now}:
                recover_s = time.monotonic() - killed
                break
            time.sleep(2)
        else:
            pytest.fail(f"not back to 2 replicas in 180 s: {replicas(local_cluster)}")
        r = client.chat.completions.create(model="tiny-chat", messages=tm.GREETING,
                                           temperature=0, max_tokens=60)
        assert r.choices[0].message.content == tm.GREETING_REPLY
        failed = len(outcomes) - outcomes.count("ok")
        summary = (f"serve replica killed under load: {len(outcomes) + 1} requests sent, "
                   f"{failed} failed ({outcomes.count('retryable')} retryable 503s), back to "
                   f"2 replicas {recover_s:.0f}s after the kill")
        print(summary)
        record_property("summary", summary)
        record_property("requests", len(outcomes) + 1)
        record_property("failed", failed)
        record_property("recover_s", round(recover_s, 1))
    finally:
        rayplane(cluster_env, "serve", "down", APP, timeout=120)
