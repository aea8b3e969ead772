"""The local platform's Serve ingress: one HAProxy on the platform's Serve port in front of the
Serve proxies of the worker nodes, with the head's proxy as a backup only.

Why: on KubeRay, Serve traffic goes to the workers' proxies through the Serve Service, and the
head is kept out of it, so losing the head (its GCS, its proxy) costs no request. Locally every
Ray node shares 127.0.0.1, so each worker node's Serve proxy gets a port of its own (Ray
Serve's ``RAY_SERVE_WORKER_PROXY_HTTP_PORT``; the head's proxy keeps ``http_options.port``,
the platform's ``serve_head`` port) and this HAProxy spreads requests over the ones that answer
their health check (``/-/healthz``). A proxy runs on a node only while the node has replicas
(Serve's rule), so a worker without replicas simply fails its check. A request whose
connection fails is sent to another proxy (``retry-on conn-failure empty-response``): a
request the dying proxy never answered is not lost.
"""

from __future__ import annotations

from pathlib import Path

#: Seconds a request may take end to end (long generations, agent runs that wait).
REQUEST_TIMEOUT_S = 600


def ingress_config(port: int, head_port: int, worker_ports: dict[str, int],
                   socket_path: Path) -> str:
    """HAProxy's configuration: the platform's Serve port -> the workers' proxies (the
    head's as backup)."""
    servers = "\n".join(
        f"    server {pool} 127.0.0.1:{wport} check" for pool, wport in sorted(worker_ports.items()))
    return f"""# Written by rayplane (raycluster/local/ingress.py): the platform's Serve ingress.
global
    maxconn 4096
    stats socket {socket_path} mode 600 level admin
    # Ray's bundled HAProxy is built without Lua etc.; nothing here needs more.

defaults
    mode http
    option httplog
    # Send each part of a response as it comes. Without it HAProxy held a token stream's
    # small writes back (MSG_MORE) and a client got the whole stream at its end: TTFT
    # equalled the request's duration (94-112 ms for 64 tokens instead of 25-45 ms). Serve's
    # own HAProxy sets it too.
    option http-no-delay
    timeout connect 2s
    timeout client {REQUEST_TIMEOUT_S}s
    timeout server {REQUEST_TIMEOUT_S}s
    timeout http-request 30s
    timeout http-keep-alive 30s
    timeout queue 30s
    retries 3
    option redispatch 1
    # Only failures that prove the request reached no application: never a retried side effect.
    retry-on conn-failure empty-response

frontend serve
    bind 127.0.0.1:{port}
    default_backend serve_proxies

backend serve_proxies
    balance leastconn
    # A fresh connection to a proxy per request: Serve's per-node HAProxy reloads on every
    # route change, and a kept-alive connection to its old process would still be answered
    # with the old routes (a just-deployed prefix falling through to the app at `/`).
    option http-server-close
    option httpchk GET /-/healthz
    http-check expect status 200
    default-server inter 1s fastinter 500ms downinter 2s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down
{servers}
    server head 127.0.0.1:{head_port} check backup
"""


def ingress_command(binary: str, ingress_dir: Path, port: int, head_port: int,
                    worker_ports: dict[str, int]) -> list[str]:
    """HAProxy's command line (in the foreground: ``-db``), its configuration written into
    ``ingress_dir``."""
    ingress_dir.mkdir(parents=True, exist_ok=True)
    config = ingress_dir / "haproxy.cfg"
    config.write_text(ingress_config(port, head_port, worker_ports, ingress_dir / "admin.sock"))
    return [binary, "-db", "-f", str(config)]


__all__ = ["REQUEST_TIMEOUT_S", "ingress_command", "ingress_config"]
