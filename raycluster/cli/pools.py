"""``rayplane pools check|show``: the pool catalog from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from raycluster.capacity import (
    MESH_PROXY_CPU_M,
    MESH_PROXY_MEMORY_MI,
    pool_budgets,
    schedulable_nodes,
    standing_nodes,
)
from raycluster.catalog import load_catalog
from raycluster.cli.common import CatalogOpt, JsonOpt, console

pools_app = typer.Typer(no_args_is_help=True, help="The pool catalog.")


@pools_app.command("check")
def pools_check(file: Path = typer.Argument(..., help="Pools file to validate.")) -> None:
    """Validate a pools file: exit 0 when good, 2 with the field named when not."""
    catalog = load_catalog(file)
    console.print(f"{file}: ok ({len(catalog.pools)} pools, "
                  f"{sum(p.gpu_units_per_node * schedulable_nodes(p) for p in catalog.pools)} GPU "
                  "units at most)")


@pools_app.command("show")
def pools_show(catalog_file: CatalogOpt = None, as_json: JsonOpt = False) -> None:
    """The pools with their derived capacity: per node, the workers that fit after
    kube-reserved, the eviction threshold, the DaemonSets and each pod's Linkerd proxy, the
    resource that runs out first, and the GPU units no worker can take (stranded)."""
    catalog = load_catalog(catalog_file)
    rows = []
    for p in catalog.pools:
        model = p.gpu_model
        fit = p.fit
        free = min((b.free for b in pool_budgets(p)), key=lambda r: (r.cpu_m, r.memory_mi))
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
            # A MIG pool keeps standing nodes (Karpenter cannot launch for MIG resources).
            "nodes": (f"{p.min_nodes}-{p.max_nodes}" if standing_nodes(p) is None
                      else f"{standing_nodes(p)} standing"),
            "capacity_type": p.capacity_type.value,
            "priority_class": p.priority_class,
            "efa": p.efa,
            "worker": {"gpu_units": p.worker.gpu_units, "cpus": p.worker.cpus,
                       "memory_gib": p.worker.memory_gib},
            "free_per_node": {"cpus": free.cpu_m / 1000,
                              "memory_gib": round(free.memory_mi / 1024, 1), "pods": free.pods},
            "workers_per_node": fit.workers,
            "workers_per_node_by": fit.limits,
            "binds": fit.binding,
            "stranded_units_per_node": fit.stranded_units,
            "max_workers": p.max_workers,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="rayplane pools")
    for col in ("pool", "instance", "GPU", "sharing", "units/node", "k8s resource", "worker",
                "free/node", "workers/node", "binds", "stranded", "nodes"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["pool"], ",".join(r["instance_types"]),
                      f"{r['gpus_per_node']}x {r['gpu_model']}" if r["gpu_model"] else "-",
                      r["sharing"], str(r["gpu_units_per_node"]),
                      r["kubernetes_resource"] or "-", _shape(r["worker"]),
                      _shape(r["free_per_node"]), str(r["workers_per_node"]), r["binds"],
                      str(r["stranded_units_per_node"]) if r["gpu_model"] else "-",
                      r["nodes"])
    console.print(table)
    console.print("free/node: allocatable after kube-reserved and eviction, minus the "
                  "DaemonSets (raycluster/capacity.py); each worker also carries the Linkerd "
                  f"proxy ({MESH_PROXY_CPU_M}m, {MESH_PROXY_MEMORY_MI}Mi). stranded: GPU units "
                  "per node that no worker can take.")


def _shape(r: dict) -> str:
    units = f"{r['gpu_units']}u " if r.get("gpu_units") else ""
    return f"{units}{r['cpus']:.3g} CPU {r['memory_gib']:.0f}Gi"
