"""What every command module shares: the consoles and the options that mean the same thing in
every command (one flag, defined once)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# Piped output (scripts, CI logs) gets wide lines rather than a table squeezed to 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

CatalogOpt = Annotated[Path | None, typer.Option("--catalog", "-c",
                                                    help="Pools file (default: the platform's).",
                                                    envvar="RAYPLANE_CATALOG")]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", envvar="RAYPLANE_STATE_DIR",
                                                  help="State folder of the local platform "
                                                       "(default ./.rayplane).")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", envvar="RAY_DASHBOARD_ADDRESS",
    help="Ray dashboard URL (default: the local platform's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def applications_table(title: str, applications: dict) -> Table:
    """Serve applications as ``rayplane serve status`` and ``rayplane agents status`` show
    them: a row per deployment with its running replicas and the first line of its message."""
    from serve.deploy import first_line  # here: commands without Serve do not load it

    table = Table(title=title)
    for col in ("application", "status", "deployment", "replicas", "message"):
        table.add_column(col)
    for name, a in applications.items():
        for dname, d in (a.get("deployments") or {}).items():
            running = sum(1 for r in d.get("replicas", []) if r.get("state") == "RUNNING")
            table.add_row(name, a.get("status", ""), dname,
                          f"{running}/{d.get('target_num_replicas', '?')}",
                          first_line(d.get("message", "")) if d.get("message") else "")
    return table


__all__ = ["AddressOpt", "CatalogOpt", "JsonOpt", "StateOpt", "applications_table", "console",
           "err_console"]
