"""What every command module shares: the consoles and the options that mean the same thing in
every command (one flag, defined once)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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

__all__ = ["AddressOpt", "CatalogOpt", "JsonOpt", "StateOpt", "console", "err_console"]
