"""``rayplane status``'s ``upstream:<model>`` parts (raycluster/local/upstream_health.py), from
what an ``openai-upstream`` replica's ``stats()`` reports through the app's ``/healthz``."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raycluster.local.health import DEGRADED, DOWN, UP, Part
from raycluster.local.upstream_health import assess_upstreams, upstream_models, upstream_parts
from serve.engines.base import EngineError
from serve.engines.upstream import UpstreamProxy
from tests.support.upstream import free_port


def app(models: list[dict], import_path: str = "serve.app:build_app", route: str = "/") -> dict:
    return {"status": "RUNNING", "route_prefix": route,
            "deployed_app_config": {"import_path": import_path, "args": {"models": models}}}


def upstream_model(name: str, base_url: str) -> dict:
    return {"name": name, "engine": "openai-upstream", "source": "x",
            "upstream": {"base_url": base_url, "model": "m", "api_key": None,
                         "connect_timeout_s": 1, "read_timeout_s": 1, "retries": 0}}


CPU = {"name": "tiny", "engine": "cpu", "source": "/m"}


def test_only_the_openai_apps_upstream_models_are_reported():
    up = upstream_model("far", "http://h:1/v1")
    assert upstream_models(app([CPU, up])) == [up]
    assert upstream_models(app([up], import_path="agents.server.app:build_agents_app")) == []
    assert upstream_models({"status": "RUNNING"}) == []


def test_a_replica_that_saw_its_upstream_down_makes_a_down_part_naming_the_host():
    port = free_port()  # nothing listens there
    m = upstream_model("far", f"http://user:secret@127.0.0.1:{port}/v1")
    proxy = UpstreamProxy(m)

    async def fail():
        with pytest.raises(EngineError):
            await proxy.chat({"model": "far", "messages": []})
        await proxy.aclose()

    asyncio.run(fail())
    healthz = {"status": "ok", "models": {"far": proxy.stats(), "tiny": {"running": 0}}}
    (part,) = assess_upstreams([m], healthz, "http://serve/healthz")
    assert part["name"] == "upstream:far" and part["status"] == DOWN
    assert f"127.0.0.1:{port}" in part["reason"] and "secret" not in part["reason"]
    assert part["details"]["failures"] == 1
    assert Part(**part).to_dict()["status"] == DOWN  # what health.py makes of it


def test_up_unknown_and_unanswered_upstreams():
    m = upstream_model("far", "http://u:pw@h:1/v1?key=k")
    up = {"models": {"far": {"upstream": {"status": "up", "url": "http://h:1/v1", "model": "m",
                                          "reason": "h:1 answered"}}}}
    assert assess_upstreams([m], up, "u")[0]["status"] == UP
    unknown = {"models": {"far": {"upstream": {"status": "unknown", "reason": "not yet"}}}}
    assert assess_upstreams([m], unknown, "u")[0]["status"] == DEGRADED
    failed = {"models": {"far": {"error": "RayActorError"}}}
    part = assess_upstreams([m], failed, "u")[0]
    assert part["status"] == DEGRADED and "RayActorError" in part["reason"]
    part = assess_upstreams([m], TimeoutError("timed out"), "u")[0]
    assert part["status"] == DEGRADED and part["reason"].startswith("http://h:1/v1: unknown")
    assert "pw" not in part["reason"] and "key=k" not in part["reason"]


def test_the_parts_are_read_from_each_apps_healthz():
    report = {"status": "degraded", "models": {"far": {"requests": 3, "upstream": {
        "status": "down", "url": "http://h:1/v1", "model": "m",
        "reason": "cannot reach h:1: connection refused", "since": 0}}}}
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            body = json.dumps(report).encode()
            self.send_response(503)  # /healthz answers 503 with its report when degraded
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        details = {"applications": {
            "openai": app([CPU, upstream_model("far", "http://h:1/v1")], route="/openai"),
            "plain": app([CPU]),
        }}
        parts = upstream_parts(f"http://127.0.0.1:{server.server_port}", details, 2.0)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["/openai/healthz"]
    (part,) = parts
    assert (part["name"], part["status"]) == ("upstream:far", DOWN)
    assert "connection refused" in part["reason"] and part["details"]["requests"] == 3
    gone = upstream_parts(f"http://127.0.0.1:{free_port()}", details, 1.0)
    assert gone[0]["status"] == DEGRADED and "connection refused" in gone[0]["reason"]
