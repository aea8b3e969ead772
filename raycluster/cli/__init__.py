"""The ``rayplane`` command line.

Every user error prints one line to stderr and exits 2 (no traceback); other subcommand
groups (render, models, serve) live beside their layer and are registered here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from raycluster.catalog import load_catalog
from raycluster.spec import SpecError

app = typer.Typer(name="rayplane", no_args_is_help=True, add_completion=False,
                  help="The Ray layer of the GPU platform: pools, local cluster, rendering.")
pools_app = typer.Typer(no_args_is_help=True, help="The pool catalog.")
app.add_typer(pools_app, name="pools")

# Piped output (scripts, CI logs) gets wide lines rather than a table squeezed to 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

CatalogOpt = Annotated[Path | None, typer.Option("--catalog", "-c",
                                                    help="Pools file (default: the platform's).",
                                                    envvar="RAYPLANE_CATALOG")]


from raycluster.errors import PlatformError as UserError  # transitional alias


@pools_app.command("check")
def pools_check(file: Path = typer.Argument(..., help="Pools file to validate.")) -> None:
    """Validate a pools file: exit 0 when good, 2 with the field named when not."""
    catalog = load_catalog(file)
    console.print(f"{file}: ok ({len(catalog.pools)} pools, "
                  f"{sum(p.gpu_units_per_node * p.max_nodes for p in catalog.pools)} GPU units "
                  "at max nodes)")


@pools_app.command("show")
def pools_show(catalog_file: CatalogOpt = None,
               as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The pools with their derived capacity."""
    catalog = load_catalog(catalog_file)
    rows = []
    for p in catalog.pools:
        model = p.gpu_model
        rows.append({
            "pool": p.name,
            "instance_types": p.instance_types,
            "gpu_model": model.name if model else None,
            "gpus_per_node": p.gpus_per_node,
            "sharing": p.sharing.mode.value + (
                f" x{p.sharing.replicas}" if p.sharing.replicas else
                f" {p.sharing.mig_profile}" if p.sharing.mig_profile else ""),
            "gpu_units_per_node": p.gpu_units_per_node,
            "memory_per_unit_gb": round(p.memory_per_unit_gb, 2),
            "kubernetes_resource": p.kubernetes_resource,
            "ray_resources_per_worker": p.ray_resources(),
            "nodes": f"{p.min_nodes}-{p.max_nodes}",
            "capacity_type": p.capacity_type.value,
            "priority_class": p.priority_class,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="rayplane pools")
    for col in ("pool", "instance", "GPU", "sharing", "units/node", "GB/unit",
                "k8s resource", "Ray resource/worker", "nodes", "capacity", "priority"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["pool"], ",".join(r["instance_types"]),
                      f"{r['gpus_per_node']}x {r['gpu_model']}" if r["gpu_model"] else "-",
                      r["sharing"], str(r["gpu_units_per_node"]),
                      f"{r['memory_per_unit_gb']:g}" if r["gpu_model"] else "-",
                      r["kubernetes_resource"] or "-",
                      json.dumps(r["ray_resources_per_worker"]), r["nodes"],
                      r["capacity_type"], r["priority_class"])
    console.print(table)


def main() -> None:
    """Console-script entry: user errors are one line on stderr and exit code 2."""
    from raycluster import demo, local  # noqa: F401  (register up/down/status/env/demo)

    _register_optional_groups()
    try:
        rv = app(standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except (SpecError, UserError) as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click's own usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


def _register_optional_groups() -> None:
    """Subcommand groups that live with their layer (rendering, models, serving)."""
    import importlib

    for module in ("raycluster.render_cli", "train.cli", "serve.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
