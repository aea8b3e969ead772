"""``rayplane serve up|down|status|chat``: deploy a serve config to the local platform (or any
Ray cluster's dashboard), watch it, and talk to it.

``up`` validates the config against the catalog, pins registry aliases to versions, checks
local folders, renders the Serve config and PUTs it through the dashboard's Serve REST API
(what ``serve deploy`` does), keeping the cluster's other applications; then it waits until
the application is RUNNING and prints the endpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from raycluster.catalog import load_catalog
from raycluster.cli import CatalogOpt, UserError, app, console
from serve.config import ServeAppConfig

serve_app = typer.Typer(no_args_is_help=True, help="The OpenAI-compatible Serve application.")
app.add_typer(serve_app, name="serve")

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"

StateOpt = Annotated[Path | None, typer.Option("--state-dir", envvar="RAYPLANE_STATE_DIR",
                                                  help="Local platform state folder.")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", envvar="RAY_DASHBOARD_ADDRESS",
    help="Ray dashboard URL (default: the local platform's).")]


class Target:
    """Where to deploy: the dashboard URL, the Serve HTTP port, the env for auth."""

    def __init__(self, address: str | None, state_dir: Path | None):
        self.local = None
        if address is None:
            from raycluster.local import LocalCluster, LocalState, default_state_dir

            st = LocalState.load((state_dir or default_state_dir()).resolve())
            if st is None:
                raise UserError("no local platform is up (run `rayplane up`) and no --address "
                                "was given")
            self.local = LocalCluster(state_dir, ports=st.ports)
            os.environ.update({k: v for k, v in self.local.env().items()
                               if k not in ("RAY_ADDRESS",)})
            address = self.local.dashboard_url
        self.address = address.rstrip("/")

    def client(self):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        # The local platform's token is passed explicitly: Ray reads RAY_AUTH_MODE once per
        # process, so a process that imported Ray before the env was set would send nothing.
        headers = self.local.auth_headers() if self.local else None
        try:
            return ServeSubmissionClient(self.address, headers=headers)
        except Exception as err:  # noqa: BLE001 - connection problems become one line
            raise UserError(f"cannot reach the Ray dashboard at {self.address}: "
                            f"{str(err).splitlines()[0]}") from None

    def serve_port(self, config_port: int) -> int:
        return self.local.ports["serve"] if self.local else config_port


def render(config: ServeAppConfig, catalog_file: Path | None, *, pin: bool = True,
           tracking_uri: str | None = None) -> tuple[ServeAppConfig, dict[str, Any]]:
    """Validate, pin registry aliases and render: everything before a deploy."""
    catalog = load_catalog(catalog_file)
    config.to_serve_config(catalog)  # refuse bad placement before touching the registry
    config.check_sources()
    if pin:
        config = config.pin_versions(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    return config, config.to_serve_config(catalog)


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


def wait_running(client, name: str, timeout: float, progress=None) -> dict:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        details = client.get_serve_details()
        app_d = (details.get("applications") or {}).get(name)
        status = app_d["status"] if app_d else "NOT_STARTED"
        if status == "RUNNING":
            return app_d
        if status == "DEPLOY_FAILED":
            raise UserError(f"application {name!r} failed to deploy: "
                            f"{_first_line(app_d.get('message', ''))}")
        deployments = (app_d or {}).get("deployments") or {}
        unhealthy = [(d, v) for d, v in deployments.items() if v.get("status") == "UNHEALTHY"]
        if unhealthy:
            d, v = unhealthy[0]
            raise UserError(f"deployment {d!r} of {name!r} is unhealthy: "
                            f"{_first_line(v.get('message', ''))}")
        msg = f"{name}: {status} " + ", ".join(f"{d} {v.get('status')}"
                                                for d, v in deployments.items())
        if progress and msg != last:
            progress(msg)
            last = msg
        if time.monotonic() > deadline:
            raise UserError(f"application {name!r} is not RUNNING after {timeout:.0f}s "
                            f"({status}); see `rayplane serve status`")
        time.sleep(1.0)


def remove_applications(client, drop) -> None:
    """Remove the applications whose name ``drop(name)`` accepts, redeploying the others.
    Removing the last one shuts Serve down, and then this waits until its controller is
    gone: Serve's DELETE returns after at most 30 s of the controller's graceful shutdown even
    when it is still going, and a config deployed to a controller that is stopping is dropped
    by it (the app never appears; seen in CI after the fault test's replicas took 33 s)."""
    details = client.get_serve_details()
    remaining = [d["deployed_app_config"] for n, d in (details.get("applications") or {}).items()
                 if not drop(n) and d.get("deployed_app_config")]
    if remaining:
        client.deploy_applications({**{k: details[k] for k in ("proxy_location", "http_options")
                                       if details.get(k)}, "applications": remaining})
        return
    client.delete_applications()
    deadline = time.monotonic() + 120
    while (client.get_serve_details().get("controller_info") or {}).get("actor_id"):
        if time.monotonic() > deadline:
            raise UserError("Serve did not shut down within 120s; see the controller's log "
                            "(logs/serve/ in the Ray session folder)")
        time.sleep(1.0)


def _first_line(text: str) -> str:
    lines = [ln for ln in str(text).splitlines() if ln.strip()]
    # Replica tracebacks end with the exception: that line says what went wrong.
    return (lines[-1] if lines else "no message")[:400]


def deploy(config_file: str | Path = DEFAULT_CONFIG, *, source: str | None = None,
           catalog_file: Path | None = None, state_dir: Path | None = None,
           address: str | None = None, timeout: float = 300, progress=None
           ) -> tuple[ServeAppConfig, str]:
    """Deploy a serve config and wait until it is RUNNING; returns the pinned config and the
    OpenAI base URL. What ``rayplane serve up`` (and ``rayplane demo``) run."""
    config = ServeAppConfig.from_file(config_file)
    if source is not None:
        if len(config.models) != 1:
            raise UserError(f"--source: {config_file} serves {len(config.models)} models; "
                            "edit the config instead")
        doc = config.model_dump(mode="json", exclude_unset=True)
        doc["models"][0]["source"] = source
        config = ServeAppConfig.parse(doc, source=str(config_file))
    target = Target(address, state_dir)
    config, rendered = render(config, catalog_file)
    rendered["http_options"]["port"] = target.serve_port(config.http.port)
    client = target.client()
    client.deploy_applications(merge_applications(client.get_serve_details(), rendered))
    wait_running(client, config.name, timeout, progress=progress)
    host, port = rendered["http_options"]["host"], rendered["http_options"]["port"]
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return config, f"http://{host}:{port}{config.route_prefix.rstrip('/')}/v1"


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
    if dry_run:
        config = ServeAppConfig.from_file(config_file)
        if source is not None and len(config.models) == 1:
            config.models[0].source = source
        _, rendered = render(config, catalog_file, pin=False)
        print(json.dumps(rendered, indent=2))
        return
    with console.status(f"deploying {config_file}") as spinner:
        config, base_url = deploy(config_file, source=source, catalog_file=catalog_file,
                                  state_dir=state_dir, address=address, timeout=timeout,
                                  progress=spinner.update)
    console.print(f"{config.name} is RUNNING: "
                  + ", ".join(f"{m.name} <- {m.source}" for m in config.models))
    console.print(f"OpenAI endpoint  {base_url}")


@serve_app.command("down")
def down_cmd(name: str = typer.Argument("openai", help="Application to remove."),
             state_dir: StateOpt = None, address: AddressOpt = None) -> None:
    """Remove one application (the others keep running)."""
    client = Target(address, state_dir).client()
    if name not in (client.get_serve_details().get("applications") or {}):
        console.print(f"{name!r} is not deployed")
        return
    remove_applications(client, lambda app: app == name)
    console.print(f"removed {name}")


@serve_app.command("status")
def status_cmd(state_dir: StateOpt = None, address: AddressOpt = None,
               as_json: bool = typer.Option(False, "--json", help="For scripts.")) -> None:
    """Applications, their deployments and replica counts."""
    target = Target(address, state_dir)
    details = target.client().get_serve_details()
    if as_json:
        print(json.dumps(details, indent=2, default=str))
        return
    table = Table(title="rayplane serve")
    for col in ("application", "status", "deployment", "replicas", "message"):
        table.add_column(col)
    for name, a in (details.get("applications") or {}).items():
        for dname, d in (a.get("deployments") or {}).items():
            running = sum(1 for r in d.get("replicas", []) if r.get("state") == "RUNNING")
            table.add_row(name, a.get("status", ""), dname,
                          f"{running}/{d.get('target_num_replicas', '?')}",
                          _first_line(d.get("message", "")) if d.get("message") else "")
    console.print(table)


def chat_once(message: str, *, model: str | None = None, max_tokens: int = 64,
              base_url: str | None = None, api_key: str | None = None,
              state_dir: Path | None = None, tools: list[dict] | None = None):
    """One chat completion through the official openai client: (model, response, base URL).
    Defaults: OPENAI_BASE_URL / OPENAI_API_KEY, else the local platform's endpoint and key.
    ``tools`` (OpenAI function specs) lets a tool-use model answer with ``tool_calls``."""
    from openai import OpenAI, OpenAIError

    base = base_url or os.environ.get("OPENAI_BASE_URL")
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if not base or not key:
        from raycluster.local import LocalCluster, LocalState, default_state_dir

        st = LocalState.load((state_dir or default_state_dir()).resolve())
        if st is None:
            raise UserError("set OPENAI_BASE_URL and OPENAI_API_KEY, or start the local "
                            "platform (`rayplane up`)")
        cluster = LocalCluster(state_dir, ports=st.ports)
        base = base or f"{cluster.serve_url}/v1"
        key = key or cluster.api_key_path.read_text().strip()
    client = OpenAI(base_url=base, api_key=key, max_retries=3, timeout=120)
    try:
        model = model or client.models.list().data[0].id
        extra = {"tools": tools} if tools else {}
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": message}],
            max_tokens=max_tokens, temperature=0, **extra)
    except OpenAIError as err:
        raise UserError(f"{base}: {err}") from None
    return model, resp, base


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
    model, resp, base = chat_once(message, model=model, max_tokens=max_tokens,
                                  base_url=base_url, state_dir=state_dir)
    choice = resp.choices[0]
    text = choice.message.content or ""
    if choice.message.tool_calls:
        text += " ".join(f"[tool call {c.function.name}({c.function.arguments})]"
                         for c in choice.message.tool_calls)
    console.print(f"[bold]{model}[/bold]: {text}", highlight=False)
    console.print(f"({resp.usage.prompt_tokens} prompt + {resp.usage.completion_tokens} "
                  f"completion tokens, finish_reason {choice.finish_reason}; endpoint {base})",
                  highlight=False)


__all__ = ["chat_once", "deploy", "merge_applications", "render", "serve_app",
           "wait_running"]
