"""Deploy a serve config to a Ray cluster and talk to it: the library beneath
``rayplane serve up|down|status|chat`` and the demo.

:func:`deploy` validates a config against the catalog, checks local folders, pins registry
aliases to versions, renders the Serve config and PUTs it through the dashboard's Serve REST
API (what ``serve deploy`` does), keeping the cluster's other applications; then it waits until
the application is RUNNING and returns the OpenAI base URL.

Where to deploy is a :class:`ServeTarget` the caller builds (the CLI from the local platform it
attaches to, or from ``--address``); nothing here reads the environment or knows the local
platform. Failures are :class:`~raycluster.errors.PlatformError` (the cluster) or
:class:`~raycluster.spec.SpecError` (the config), one line each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raycluster.catalog import Catalog, load_catalog
from raycluster.errors import PlatformError
from serve.builder import to_serve_config
from serve.config import ServeAppConfig
from serve.registry import check_sources, pin_versions

#: The local platform's serve config (the registered chat model on the CPU engine).
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ServeTarget:
    """A Ray cluster to deploy to: its dashboard (the Serve REST API), the headers that
    authenticate there (Ray token auth), and, on the local platform: the port its Serve
    proxies listen on when that is not the config's ``http.port``, where they run
    (``proxy_location``), the URL clients reach them at (its ingress) and the file that keeps
    the last applied Serve config (``rayplane up`` restores it after a lost head)."""

    dashboard_url: str
    headers: dict[str, str] | None = None
    serve_port: int | None = None
    proxy_location: str | None = None
    public_url: str | None = None
    record: Path | None = None
    #: Every Serve proxy behind ``public_url`` (the local platform's ingress balances over
    #: them): a deploy waits until each that runs knows the new routes (``wait_routes``).
    proxy_urls: tuple[str, ...] = ()


def apply(serve_client, target: ServeTarget, config: dict) -> None:
    """Deploy the whole Serve config (every application) and keep it as the target's record."""
    serve_client.deploy_applications(config)
    if target.record is not None:
        tmp = target.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(target.record)


def applied(target: ServeTarget) -> dict | None:
    """The Serve config last applied to ``target`` through rayplane (None: none recorded)."""
    if target.record is None or not target.record.is_file():
        return None
    config = json.loads(target.record.read_text())
    return config if config.get("applications") else None


def client(target: ServeTarget):
    """Ray's ``ServeSubmissionClient`` for ``target`` (PlatformError when unreachable)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    address = target.dashboard_url.rstrip("/")
    # The token goes in explicit headers: Ray reads RAY_AUTH_MODE once per process, so a
    # process that imported Ray before that was set would send nothing.
    try:
        return ServeSubmissionClient(address, headers=target.headers)
    except Exception as err:  # noqa: BLE001 - connection problems become one line
        raise PlatformError(f"cannot reach the Ray dashboard at {address}: "
                            f"{str(err).splitlines()[0]}") from None


def with_source(config: ServeAppConfig, source: str, origin: str = "") -> ServeAppConfig:
    """``config`` serving its one model from ``source`` instead (validated as in a file)."""
    doc = config.model_dump(mode="json", exclude_unset=True)
    doc["models"][0]["source"] = source
    return ServeAppConfig.parse(doc, source=origin)


def render(config: ServeAppConfig, catalog: Catalog | None = None, *, pin: bool = True,
           tracking_uri: str | None = None) -> tuple[ServeAppConfig, dict[str, Any]]:
    """Validate, pin registry aliases (against ``tracking_uri``) and render: everything
    before a deploy. Returns the (pinned) config and its Serve config."""
    catalog = catalog or load_catalog()
    to_serve_config(config, catalog)  # refuse bad placement before touching the registry
    check_sources(config)
    if pin:
        config = pin_versions(config, tracking_uri)
    return config, to_serve_config(config, catalog)


def merge_applications(current: dict, new_config: dict) -> dict:
    """The cluster's deployed apps with ``new_config``'s replacing those of the same name, so
    deploying one app never removes another (the REST API replaces the whole set)."""
    mine = {a["name"] for a in new_config["applications"]}
    others = []
    for name, details in (current.get("applications") or {}).items():
        deployed = details.get("deployed_app_config")
        if name not in mine and deployed:
            others.append(deployed)
    merged = dict(new_config)
    merged["applications"] = others + list(new_config["applications"])
    return merged


def _deployment_failure(app_d: dict) -> str:
    """Why a failed deployment failed: the exception its replica raised (the last line of
    Serve's message, a traceback), so a user sees it without opening the logs."""
    for d, v in (app_d.get("deployments") or {}).items():
        lines = [x.strip() for x in (v.get("message") or "").splitlines() if x.strip()]
        if v.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") and lines:
            return f" ({d}: {lines[-1][:300]})"
    return ""


def wait_running(serve_client, name: str, timeout: float, progress: Progress | None = None
                 ) -> dict:
    """Wait until application ``name`` is RUNNING (its details); PlatformError when it fails
    to deploy, a deployment is unhealthy or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        details = serve_client.get_serve_details()
        app_d = (details.get("applications") or {}).get(name)
        status = app_d["status"] if app_d else "NOT_STARTED"
        if status == "RUNNING":
            return app_d
        if status == "DEPLOY_FAILED":
            raise PlatformError(f"application {name!r} failed to deploy: "
                                f"{first_line(app_d.get('message', ''))}"
                                f"{_deployment_failure(app_d)}")
        deployments = (app_d or {}).get("deployments") or {}
        unhealthy = [(d, v) for d, v in deployments.items() if v.get("status") == "UNHEALTHY"]
        if unhealthy:
            d, v = unhealthy[0]
            raise PlatformError(f"deployment {d!r} of {name!r} is unhealthy: "
                                f"{first_line(v.get('message', ''))}")
        msg = f"{name}: {status} " + ", ".join(f"{d} {v.get('status')}"
                                                for d, v in deployments.items())
        if progress and msg != last:
            progress(msg)
            last = msg
        if time.monotonic() > deadline:
            raise PlatformError(f"application {name!r} is not RUNNING after {timeout:.0f}s "
                                f"({status}); see `rayplane serve status`")
        time.sleep(1.0)


def remove_applications(serve_client, drop: Callable[[str], bool],
                        target: ServeTarget | None = None) -> None:
    """Remove the applications whose name ``drop(name)`` accepts, redeploying the others.
    Removing the last one shuts Serve down, and then this waits until its controller is
    gone: Serve's DELETE returns after at most 30 s of the controller's graceful shutdown even
    when it is still going, and a config deployed to a controller that is stopping is dropped
    by it (the app never appears; seen in CI after the fault test's replicas took 33 s)."""
    details = serve_client.get_serve_details()
    remaining = [d["deployed_app_config"] for n, d in (details.get("applications") or {}).items()
                 if not drop(n) and d.get("deployed_app_config")]
    config = {**{k: details[k] for k in ("proxy_location", "http_options") if details.get(k)},
              "applications": remaining}
    if remaining:
        apply(serve_client, target or ServeTarget(""), config)
        return
    serve_client.delete_applications()
    if target is not None and target.record is not None:
        target.record.unlink(missing_ok=True)
    deadline = time.monotonic() + 120
    while (serve_client.get_serve_details().get("controller_info") or {}).get("actor_id"):
        if time.monotonic() > deadline:
            raise PlatformError("Serve did not shut down within 120s; see the controller's "
                                "log (logs/serve/ in the Ray session folder)")
        time.sleep(1.0)


def first_line(text: str) -> str:
    """The line of a Serve status message that says what went wrong."""
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    # Replica tracebacks end with the exception: that line says what went wrong.
    return (lines[-1] if lines else "no message")[:400]


def deploy(config: ServeAppConfig | str | Path, target: ServeTarget, *,
           catalog: Catalog | None = None, tracking_uri: str | None = None,
           timeout: float = 300, progress: Progress | None = None
           ) -> tuple[ServeAppConfig, str]:
    """Deploy a serve config (or the file holding one) to ``target`` and wait until it is
    RUNNING. Registry aliases are pinned against the MLflow server at ``tracking_uri``
    (default: the config's own). Returns the pinned config and the OpenAI base URL."""
    if not isinstance(config, ServeAppConfig):
        config = ServeAppConfig.from_file(config)
    config, rendered = render(config, catalog, tracking_uri=tracking_uri)
    at_target(rendered, target)
    serve_client = client(target)
    apply(serve_client, target, merge_applications(serve_client.get_serve_details(), rendered))
    for app in rendered["applications"]:  # a mixed config with vllm has two
        wait_running(serve_client, app["name"], timeout, progress=progress)
    wait_routes(target, [config.route_prefix])
    return config, f"{public_url(rendered, target)}{config.route_prefix.rstrip('/')}/v1"


def wait_routes(target: ServeTarget, prefixes: list[str], timeout: float = 120) -> None:
    """Until every running Serve proxy of ``target`` routes ``prefixes``: an app is RUNNING
    before each proxy has learnt its route, and behind a balancer a client's first requests
    would otherwise meet a 404 from a proxy that has not (or, worse, the app at ``/`` answering
    for it). A proxy that does not answer (none runs on a node without replicas, and a starting
    one fails its health check too) is asked again each round: settled means two rounds a second
    apart in which every proxy that answered listed every prefix. PlatformError naming the
    proxies that still lack a route after ``timeout`` seconds."""
    wanted = {p.rstrip("/") or "/" for p in prefixes}
    deadline = time.monotonic() + timeout
    settled = 0
    while True:
        lacking: dict[str, set[str]] = {}
        for url in target.proxy_urls:
            routes = proxy_routes(url)
            if routes is None:
                continue  # no proxy there now (or not one that lists routes yet)
            if not wanted <= routes:
                lacking[url] = wanted - routes
        settled = settled + 1 if not lacking else 0
        if settled >= 2 or not target.proxy_urls:
            return
        if time.monotonic() > deadline:
            what = "; ".join(f"{url} lacks {', '.join(sorted(miss))}"
                             for url, miss in sorted(lacking.items()))
            raise PlatformError(f"Serve proxies did not learn the new routes within "
                                f"{timeout:.0f}s: {what}")
        time.sleep(1)


def proxy_routes(url: str) -> set[str] | None:
    """The route prefixes the Serve proxy at ``url`` lists, or None when it does not answer
    with a list: nothing listens, it is starting (a text message, not JSON), or its HAProxy is
    reloading and cuts the answer short (http.client's errors are no OSError)."""
    import http.client
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/-/routes", timeout=2) as resp:
            listed = json.loads(resp.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    if not isinstance(listed, (dict, list)):
        return None
    return {r.rstrip("/") or "/" for r in listed if isinstance(r, str)}


def at_target(rendered: dict, target: ServeTarget) -> dict:
    """``rendered`` (a Serve config) with the target's proxy port and placement."""
    if target.serve_port is not None:
        rendered["http_options"]["port"] = target.serve_port
    if target.proxy_location is not None:
        rendered["proxy_location"] = target.proxy_location
    return rendered


def public_url(rendered: dict, target: ServeTarget) -> str:
    """Where clients reach the Serve proxies of ``rendered`` on ``target``."""
    if target.public_url:
        return target.public_url.rstrip("/")
    host, port = rendered["http_options"]["host"], rendered["http_options"]["port"]
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}"


def chat_once(message: str, *, base_url: str, api_key: str, model: str | None = None,
              max_tokens: int = 64, tools: list[dict] | None = None):
    """One greedy chat completion through the official openai client at ``base_url``:
    (model, response). ``model`` defaults to the first one served; ``tools`` (OpenAI
    function specs) lets a tool-use model answer with ``tool_calls``."""
    from openai import OpenAI, OpenAIError

    openai_client = OpenAI(base_url=base_url, api_key=api_key, max_retries=3, timeout=120)
    try:
        model = model or openai_client.models.list().data[0].id
        extra = {"tools": tools} if tools else {}
        resp = openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": message}],
            max_tokens=max_tokens, temperature=0, **extra)
    except OpenAIError as err:
        raise PlatformError(f"{base_url}: {err}") from None
    return model, resp


__all__ = ["DEFAULT_CONFIG", "ServeTarget", "applied", "apply", "at_target", "chat_once",
           "client", "deploy", "first_line", "merge_applications", "public_url",
           "proxy_routes", "remove_applications", "render", "wait_routes", "wait_running", "with_source"]
