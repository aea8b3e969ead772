"""``rayplane serve up|down|status|chat``: deploy a serve config to the local platform (or any
Ray cluster's dashboard), watch it, and talk to it.

The commands are thin over ``serve.deploy``; this module only decides where they go: the
local platform recorded in ``--state-dir`` (attached with ``LocalCluster.attach``), or the
dashboard at ``--address``. ``up`` validates the config against the catalog, pins registry
aliases to versions, checks local folders, renders the Serve config and deploys it, keeping
the cluster's other applications; then it waits until the application is RUNNING and prints
the endpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from raycluster.catalog import load_catalog
from raycluster.cli.common import (
    AddressOpt,
    CatalogOpt,
    JsonOpt,
    StateOpt,
    applications_table,
    console,
)
from raycluster.errors import PlatformError
from raycluster.local import LocalCluster
from raycluster.spec import SpecError
from serve.config import ServeAppConfig
from serve.deploy import (
    DEFAULT_CONFIG,
    Progress,
    ServeTarget,
    applied,
    apply,
    chat_once,
    client,
    deploy,
    remove_applications,
    render,
    wait_routes,
    wait_running,
    with_source,
)

serve_app = typer.Typer(no_args_is_help=True, help="The OpenAI-compatible Serve application.")


def attach_local(state_dir: Path | None, missing: str) -> LocalCluster:
    """The local platform recorded in ``state_dir``; PlatformError(``missing``) when none
    was started there."""
    cluster = LocalCluster.attach(state_dir)
    if cluster.state() is None:
        raise PlatformError(missing)
    return cluster


def cluster_target(cluster: LocalCluster) -> ServeTarget:
    """Where ``serve.deploy`` deploys on the local platform: its dashboard, its Ray token, a
    Serve proxy on every node with replicas (the head's on its own port, the workers' on
    theirs) behind the platform's ingress (raycluster/local/ingress.py), and the record
    ``rayplane up`` restores the applications from."""
    return ServeTarget(dashboard_url=cluster.dashboard_url, headers=cluster.auth_headers(),
                       serve_port=cluster.ports["serve_head"], proxy_location="EveryNode",
                       public_url=cluster.serve_url, record=cluster.serve_record_path,
                       proxy_urls=cluster.serve_proxy_urls())


def restore_applications(cluster: LocalCluster, timeout: float = 600,
                         progress: Progress | None = None) -> list[str]:
    """Deploy again the Serve config last applied through rayplane when some of its
    applications are missing (a platform that lost its head without ``--ha``, or whose Serve
    controller lost them); wait until each runs. Returns the names restored."""
    target = cluster_target(cluster)
    config = applied(target)
    if config is None:
        return []
    serve_client = client(target)
    running = set(serve_client.get_serve_details().get("applications") or {})
    missing = [a["name"] for a in config["applications"] if a["name"] not in running]
    if not missing:
        return []
    apply(serve_client, target, config)
    for name in missing:
        wait_running(serve_client, name, timeout, progress=progress)
    wait_routes(target, [a["route_prefix"] for a in config["applications"]
                         if a["name"] in missing and a.get("route_prefix")])
    return missing


def resolve_target(address: str | None, state_dir: Path | None
                   ) -> tuple[ServeTarget, str | None]:
    """(target, MLflow tracking URI) of ``--address`` or else of the local platform."""
    if address is not None:
        return ServeTarget(dashboard_url=address), os.environ.get("MLFLOW_TRACKING_URI")
    cluster = attach_local(state_dir, "no local platform is up (run `rayplane up`) and no "
                                      "--address was given")
    return cluster_target(cluster), cluster.mlflow_uri


def _load(config_file: Path, source: str | None) -> ServeAppConfig:
    config = ServeAppConfig.from_file(config_file)
    if source is None:
        return config
    if len(config.models) != 1:
        raise SpecError(f"--source: {config_file} serves {len(config.models)} models; edit "
                        "the config instead", field="--source")
    return with_source(config, source, origin=str(config_file))


@serve_app.command("up")
def up_cmd(config_file: Path = typer.Argument(DEFAULT_CONFIG, help="Serve config (YAML)."),
           source: str | None = typer.Option(None, "--source", help="Replace the model "
                                                "source of a one-model config (models:/NAME@"
                                                "alias, s3://..., a folder)."),
           catalog_file: CatalogOpt = None, state_dir: StateOpt = None,
           address: AddressOpt = None,
           timeout: float = typer.Option(300, help="Seconds to wait for RUNNING."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the Serve config "
                                                                 "and stop.")) -> None:
    """Deploy (or update) the application; waits until it answers."""
    config = _load(config_file, source)
    catalog = load_catalog(catalog_file)
    if dry_run:
        _, rendered = render(config, catalog, pin=False)
        print(json.dumps(rendered, indent=2))
        return
    target, tracking_uri = resolve_target(address, state_dir)
    with console.status(f"deploying {config_file}") as spinner:
        config, base_url = deploy(config, target, catalog=catalog, tracking_uri=tracking_uri,
                                  timeout=timeout, progress=spinner.update)
    console.print(f"{config.name} is RUNNING: "
                  + ", ".join(f"{m.name} <- {m.source}" for m in config.models))
    console.print(f"OpenAI endpoint  {base_url}")


@serve_app.command("down")
def down_cmd(name: str = typer.Argument("openai", help="Application to remove."),
             state_dir: StateOpt = None, address: AddressOpt = None) -> None:
    """Remove one application (the others keep running)."""
    target = resolve_target(address, state_dir)[0]
    serve_client = client(target)
    if name not in (serve_client.get_serve_details().get("applications") or {}):
        console.print(f"{name!r} is not deployed")
        return
    # A mixed config's vllm models run in `<name>-vllm` (serve/builder.py mixed_with_vllm).
    remove_applications(serve_client, lambda app: app in (name, f"{name}-vllm"), target)
    console.print(f"removed {name}")


@serve_app.command("status")
def status_cmd(state_dir: StateOpt = None, address: AddressOpt = None,
               as_json: JsonOpt = False) -> None:
    """Applications, their deployments and replica counts."""
    details = client(resolve_target(address, state_dir)[0]).get_serve_details()
    if as_json:
        print(json.dumps(details, indent=2, default=str))
        return
    table = applications_table("rayplane serve", (details.get("applications") or {}))
    console.print(table)


@serve_app.command("chat")
def chat_cmd(message: str = typer.Argument("Hello!", help="User message."),
             model: str | None = typer.Option(None, help="Model (default: the first "
                                                            "served)."),
             max_tokens: int = typer.Option(64, help="Most tokens to generate."),
             base_url: str | None = typer.Option(None, "--base-url",
                                                    help="OpenAI base URL (default: "
                                                         "OPENAI_BASE_URL or the local "
                                                         "platform's /v1)."),
             state_dir: StateOpt = None) -> None:
    """Send one chat completion with the official openai client and print it."""
    base = base_url or os.environ.get("OPENAI_BASE_URL")
    key = os.environ.get("OPENAI_API_KEY")
    if not base or not key:
        cluster = attach_local(state_dir, "set OPENAI_BASE_URL and OPENAI_API_KEY, or start "
                                          "the local platform (`rayplane up`)")
        base = base or f"{cluster.serve_url}/v1"
        key = key or cluster.api_key_path.read_text().strip()
    model, resp = chat_once(message, base_url=base, api_key=key, model=model,
                            max_tokens=max_tokens)
    choice = resp.choices[0]
    text = choice.message.content or ""
    if choice.message.tool_calls:
        text += " ".join(f"[tool call {c.function.name}({c.function.arguments})]"
                         for c in choice.message.tool_calls)
    console.print(f"[bold]{model}[/bold]: {text}", highlight=False)
    console.print(f"({resp.usage.prompt_tokens} prompt + {resp.usage.completion_tokens} "
                  f"completion tokens, finish_reason {choice.finish_reason}; endpoint {base})",
                  highlight=False)


__all__ = ["attach_local", "chat_cmd", "cluster_target", "down_cmd", "resolve_target", "restore_applications",
           "serve_app", "status_cmd", "up_cmd"]
