"""``rayplane agents up|down|status``: deploy the agents app (LangGraph graphs behind the
LangGraph server API, and the platform tools over MCP beside it) to the local platform or any
Ray cluster's dashboard, and watch it.

Thin over ``agents.serve_app`` (the Serve config of an agents config, pure) and the generic
Serve REST helpers of ``serve.deploy``. This module only decides where the apps go and what
the replicas must be told about the platform they run on: the local platform's Ray nodes were
started before any agents app existed, so the model endpoint, the checkpointer's DSN file and
the dashboard the platform tools read go into the applications' ``runtime_env``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from agents.serve_app import DEFAULT_CONFIG, app_names, serve_config
from agents.spec import AgentsAppConfig
from raycluster.catalog import load_catalog
from raycluster.cli.common import (
    AddressOpt,
    CatalogOpt,
    JsonOpt,
    StateOpt,
    applications_table,
    console,
)
from raycluster.cli.serve import attach_local, cluster_target
from raycluster.errors import PlatformError
from raycluster.local import LocalCluster
from raycluster.spec import SpecError
from serve.deploy import (
    ServeTarget,
    apply,
    at_target,
    client,
    merge_applications,
    public_url,
    remove_applications,
    wait_routes,
    wait_running,
)

#: What the replicas read to find the platform (``rayplane env`` exports them): the dashboard
#: and its token (platform tools), MLflow (ops graph, traces), the OpenAI endpoint and its key
#: file (the graphs' model), the checkpointer's DSN file, the pool catalog.
PLATFORM_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "OPENAI_BASE_URL",
                "RAYPLANE_API_KEY_FILE", "RAYPLANE_POSTGRES_DSN_FILE", "RAYPLANE_CATALOG",
                # The tools graph reaches the MCP app through this host's Serve proxy.
                "RAYPLANE_SERVE_PORT")
DEFAULT_SERVE_PORT = 8000

agents_app = typer.Typer(no_args_is_help=True,
                         help="The agents app: LangGraph graphs on Serve, and MCP tools.")

ConfigArg = typer.Argument(None, help="Agents config (YAML; default: agents/configs/local.yaml).",
                           show_default=False)
FileOpt = typer.Option(None, "--file", "-f", help="Agents config (same as CONFIG).")


def load_config(config_file: Path | None, file: Path | None) -> tuple[Path, AgentsAppConfig]:
    if config_file is not None and file is not None and config_file != file:
        raise SpecError(f"--file: {file} and CONFIG {config_file} name two configs; give one",
                        field="--file")
    path = config_file or file or DEFAULT_CONFIG
    return path, AgentsAppConfig.from_file(path)


def platform_env(cluster: LocalCluster | None) -> dict[str, str]:
    """The platform variables for the replicas: the local platform's, or (``--address``)
    those set in this environment."""
    source = cluster.env() if cluster is not None else os.environ
    return {k: source[k] for k in PLATFORM_ENV if source.get(k)}


def _target(address: str | None, state_dir: Path | None
            ) -> tuple[ServeTarget, LocalCluster | None]:
    if address is not None:
        return ServeTarget(dashboard_url=address), None
    cluster = attach_local(state_dir, "no local platform is up (run `rayplane up`) and no "
                                      "--address was given")
    return cluster_target(cluster), cluster


def urls(config: AgentsAppConfig, base: str) -> dict[str, str]:
    """Where the apps answer: ``base`` is the Serve ingress (or proxy) URL."""
    out = {"api": f"{base}{config.route_prefix}"}
    if config.mcp.enabled:
        out["mcp"] = f"{base}{config.mcp.route_prefix}"
    return out


def deploy(config: AgentsAppConfig, catalog, target: ServeTarget, cluster: LocalCluster | None,
           *, timeout: float = 300, progress=None) -> dict[str, str]:
    """Deploy the agents app (and its MCP server) beside what runs on ``target``, wait until
    they are RUNNING and return their URLs."""
    rendered = at_target(serve_config(config, catalog, host="127.0.0.1", port=DEFAULT_SERVE_PORT,
                                      proxy_location="HeadOnly",
                                      env_vars=platform_env(cluster)), target)
    serve_client = client(target)
    apply(serve_client, target, merge_applications(serve_client.get_serve_details(), rendered))
    for name in app_names(config):
        wait_running(serve_client, name, timeout, progress=progress)
    wait_routes(target, [a["route_prefix"] for a in rendered["applications"]
                         if a["name"] in app_names(config) and a.get("route_prefix")])
    return urls(config, public_url(rendered, target))


def deploy_agents(cluster: LocalCluster, config_path: Path, *, timeout: float = 300,
                  progress=None) -> dict[str, str]:
    """``rayplane agents up CONFIG`` on the local platform (the demo's agent step)."""
    config = AgentsAppConfig.from_file(config_path)
    return deploy(config, load_catalog(cluster.catalog_path), cluster_target(cluster), cluster,
                  timeout=timeout, progress=progress)


@agents_app.command("up")
def up_cmd(config_file: Path | None = ConfigArg, file: Path | None = FileOpt,
           catalog_file: CatalogOpt = None, state_dir: StateOpt = None,
           address: AddressOpt = None,
           timeout: float = typer.Option(300, help="Seconds to wait for RUNNING."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the Serve config and "
                                                                 "stop.")) -> None:
    """Deploy (or update) the agents app and its MCP server; waits until they run."""
    path, config = load_config(config_file, file)
    catalog = load_catalog(catalog_file)
    # Refuse a bad placement before touching any cluster.
    rendered = serve_config(config, catalog, host="127.0.0.1", proxy_location="HeadOnly")
    if dry_run:
        print(json.dumps(rendered, indent=2))
        return
    target, cluster = _target(address, state_dir)
    with console.status(f"deploying {path}") as spinner:
        at = deploy(config, catalog, target, cluster, timeout=timeout, progress=spinner.update)
    console.print(f"{config.name} is RUNNING: graphs {', '.join(config.graphs)} on pool "
                  f"{config.pool}")
    console.print(f"agents API  {at['api']}  (langgraph-sdk: get_client(url=..., api_key=...))")
    if "mcp" in at:
        console.print(f"MCP server  {at['mcp']}  (streamable HTTP, Authorization: Bearer <key>)")


@agents_app.command("down")
def down_cmd(config_file: Path | None = ConfigArg, file: Path | None = FileOpt,
             state_dir: StateOpt = None, address: AddressOpt = None,
             timeout: float = typer.Option(120, help="Seconds to wait until they are gone.")
             ) -> None:
    """Remove the agents app and its MCP server (other applications keep running)."""
    _, config = load_config(config_file, file)
    names = set(app_names(config))
    target = _target(address, state_dir)[0]
    serve_client = client(target)
    deployed = names & set(serve_client.get_serve_details().get("applications") or {})
    if not deployed:
        console.print(f"{config.name!r} is not deployed")
        return
    remove_applications(serve_client, lambda app: app in names, target)
    # Serve answers the redeploy at once and deletes the apps' replicas after (status
    # DELETING); a following `up` or status should find them gone.
    deadline = time.monotonic() + timeout
    while names & set(serve_client.get_serve_details().get("applications") or {}):
        if time.monotonic() > deadline:
            raise PlatformError(f"{', '.join(sorted(deployed))} still deleting after "
                                f"{timeout:.0f}s; see `rayplane agents status`")
        time.sleep(1.0)
    console.print(f"removed {', '.join(sorted(deployed))}")


@agents_app.command("status")
def status_cmd(config_file: Path | None = ConfigArg, file: Path | None = FileOpt,
               state_dir: StateOpt = None, address: AddressOpt = None,
               as_json: JsonOpt = False) -> None:
    """The agents app's applications, deployments, replicas and URLs."""
    _, config = load_config(config_file, file)
    target, _ = _target(address, state_dir)
    apps = client(target).get_serve_details().get("applications") or {}
    mine = {name: apps[name] for name in app_names(config) if name in apps}
    at = urls(config, target.public_url or
              f"http://127.0.0.1:{target.serve_port or DEFAULT_SERVE_PORT}")
    if as_json:
        print(json.dumps({"applications": mine, "urls": at}, indent=2, default=str))
        return
    if not mine:
        raise PlatformError(f"{config.name!r} is not deployed (run `rayplane agents up`)")
    table = applications_table("rayplane agents", mine)
    console.print(table)
    for what, url in at.items():
        console.print(f"{what:<4} {url}")


__all__ = ["agents_app", "deploy", "deploy_agents", "down_cmd", "load_config", "platform_env", "status_cmd", "up_cmd",
           "urls"]
