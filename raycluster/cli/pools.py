"""``rayplane pools check|show``: the pool catalog from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from raycluster.catalog import load_catalog
from raycluster.cli.common import CatalogOpt, JsonOpt, console

pools_app = typer.Typer(no_args_is_help=True, help="The pool catalog.")


@pools_app.command("check")
def pools_check(file: Path = typer.Argument(..., help="Pools file to validate.")) -> None:
    """Validate a pools file: exit 0 when good, 2 with the field named when not."""
    catalog = load_catalog(file)
    console.print(f"{file}: ok ({len(catalog.pools)} pools, "
                  f"{sum(p.gpu_units_per_node * p.max_nodes for p in catalog.pools)} GPU units "
                  "at max nodes)")


@pools_app.command("show")
def pools_show(catalog_file: CatalogOpt = None, as_json: JsonOpt = False) -> None:
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
