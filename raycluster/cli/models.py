"""``rayplane models ...``: the model registry from the command line.

``rayplane models list`` shows registered models, versions, aliases and held-out exact match;
``rayplane models promote NAME VERSION`` moves the ``champion`` alias (what serve configs
name as ``models:/NAME@champion``); ``rayplane models register RUN_ID`` registers a run's
``model`` artifact (e.g. a sweep's best) as a new version with alias ``candidate``.
Registry errors are ``SpecError`` naming the argument; the root turns them into one line and
exit 2.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from raycluster.cli.common import JsonOpt, console
from train import tracking

models_app = typer.Typer(no_args_is_help=True,
                         help="The MLflow model registry: list, promote, register.")

UriOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking server (default: env MLFLOW_TRACKING_URI).")]


def _uri(uri: str | None) -> str:
    return tracking.check_tracking_server(uri or os.environ.get("MLFLOW_TRACKING_URI"),
                                          field="--tracking-uri")


@models_app.command("list")
def list_cmd(name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
             tracking_uri: UriOpt = None, as_json: JsonOpt = False) -> None:
    """Registered models: versions, aliases, run and held-out exact match."""
    rows = tracking.list_models(_uri(tracking_uri), name)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no registered models")
        return
    table = Table(title="registered models")
    for col in ("model", "version", "aliases", "exact match", "run", "created"):
        table.add_column(col)
    for r in rows:
        created = datetime.fromtimestamp(r["created"] / 1000, tz=UTC)
        em = r["exact_match"]
        table.add_row(r["model"], r["version"], ", ".join(r["aliases"]) or "-",
                      f"{float(em):.1%}" if em else "-", (r["run_id"] or "-")[:12],
                      created.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@models_app.command("promote")
def promote_cmd(name: Annotated[str, typer.Argument(help="Registered model.")],
                version: Annotated[str, typer.Argument(help="Version to make champion.")],
                tracking_uri: UriOpt = None,
                alias: str = typer.Option(tracking.CHAMPION, help="Alias to move.")) -> None:
    """Point the champion alias at VERSION (serve configs name models:/NAME@champion)."""
    previous = tracking.promote(_uri(tracking_uri), name, version, alias)
    was = f" (was version {previous})" if previous and previous != version else ""
    console.print(f"{name}@{alias} -> version {version}{was}")


@models_app.command("register")
def register_cmd(run_id: Annotated[str, typer.Argument(help="MLflow run with a 'model' "
                                                            "artifact.")],
                 name: str = typer.Option("rayplane-tool-llm", "--name",
                                          help="Registered model name."),
                 tracking_uri: UriOpt = None) -> None:
    """Register runs:/RUN_ID/model as a new version with alias candidate."""
    version = tracking.register_run(_uri(tracking_uri), name, run_id)
    console.print(f"registered {name} version {version} (alias {tracking.CANDIDATE})")
