"""Terraform variables for the node pools, rendered from the pool catalog.

Pools without GPUs (the cpu system pool) are EKS managed node groups: the node-pool module
(``infra/terraform/modules/node-pool``) takes them as one typed map variable, ``node_pools``.
GPU pools are provisioned by Karpenter from the NodePools and EC2NodeClasses rendered into
``infra/k8s``; Terraform only needs to know which of them use EFA (an EFA security group and a
cluster placement group per such pool, ``modules/karpenter``): ``karpenter_pools``. Nothing
about a pool is typed in Terraform. ``render_tfvars`` turns the catalog into both maps (pure),
``write_tfvars`` writes them where Terraform picks them up by itself:
``infra/terraform/environments/<env>/pools.auto.tfvars.json`` (``rayplane render`` calls it).
A test fails when the committed file drifts from what the catalog renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raycluster.catalog import Catalog, Pool, TaintEffect
from raycluster.spec import SpecError

REPO = Path(__file__).resolve().parents[1]
TERRAFORM_DIR = REPO / "infra" / "terraform"
#: File name Terraform loads automatically from an environment's folder (``*.auto.tfvars.json``).
TFVARS_NAME = "pools.auto.tfvars.json"

#: The EKS API spells taint effects in upper snake case (CreateNodegroup ``taints[].effect``).
EKS_TAINT_EFFECT: dict[TaintEffect, str] = {
    TaintEffect.no_schedule: "NO_SCHEDULE",
    TaintEffect.prefer_no_schedule: "PREFER_NO_SCHEDULE",
    TaintEffect.no_execute: "NO_EXECUTE",
}

#: EKS-optimized AMI families. GPU pools take the NVIDIA variant: it carries the driver and
#: container toolkit, so the GPU Operator runs with ``driver.enabled=false`` and only adds the
#: device plugin, GFD, the MIG manager and DCGM (docs/deployment.md).
AMI_TYPE_CPU = "AL2023_x86_64_STANDARD"
AMI_TYPE_GPU = "AL2023_x86_64_NVIDIA"


def tfvars_path(environment: str = "production") -> Path:
    """Where an environment's generated pools file lives."""
    return TERRAFORM_DIR / "environments" / environment / TFVARS_NAME


def render_node_pool(pool: Pool, index: int = 0) -> dict[str, Any]:
    """One entry of the ``node_pools`` map: what the EKS managed node group of ``pool`` needs.
    ``index`` is the pool's place in the catalog (errors name ``pools[<index>]``)."""
    if pool.max_nodes < 1:
        # CreateNodegroup refuses maxSize 0; say so before Terraform or AWS does.
        raise SpecError(f"pools[{index}].max_nodes: {pool.max_nodes} cannot become an EKS node "
                        "group; a managed node group needs max_nodes >= 1 (set min_nodes: 0 to "
                        "let the pool scale to zero)", field=f"pools[{index}].max_nodes")
    return {
        "instance_types": list(pool.instance_types),
        "capacity_type": pool.capacity_type.value,
        "ami_type": AMI_TYPE_GPU if pool.has_gpu else AMI_TYPE_CPU,
        "min_size": pool.min_nodes,
        "max_size": pool.max_nodes,
        "desired_size": pool.desired_nodes if pool.desired_nodes is not None else pool.min_nodes,
        "disk_size_gib": pool.disk_size_gib,
        # node_labels carries the pool label and the GPU Operator labels that pick the
        # device plugin's time-slicing entry or the MIG manager's layout for the node.
        "labels": dict(sorted(pool.node_labels.items())),
        "taints": [{"key": t.key, "value": t.value, "effect": EKS_TAINT_EFFECT[t.effect]}
                   for t in pool.taints],
    }


def is_managed_node_group(pool: Pool) -> bool:
    """Whether ``pool`` is an EKS managed node group (no GPUs: the system pool the heads, the
    MLOps tools and Karpenter itself run on) rather than provisioned by Karpenter (GPU pools,
    which scale from zero when a Ray worker is pending)."""
    return not pool.has_gpu


def render_karpenter_pool(pool: Pool) -> dict[str, Any]:
    """One entry of the ``karpenter_pools`` map: what Terraform makes for a Karpenter pool."""
    return {"efa": pool.efa}


def render_tfvars(catalog: Catalog) -> dict[str, Any]:
    """The ``pools.auto.tfvars.json`` document: ``{"node_pools": {<pool without GPUs>: {...}},
    "karpenter_pools": {<GPU pool>: {"efa": ...}}}``."""
    return {
        "node_pools": {pool.name: render_node_pool(pool, i)
                       for i, pool in enumerate(catalog.pools) if is_managed_node_group(pool)},
        "karpenter_pools": {pool.name: render_karpenter_pool(pool)
                            for pool in catalog.pools if not is_managed_node_group(pool)},
    }


def tfvars_text(catalog: Catalog) -> str:
    """The file's exact text (stable: the drift test and reviews compare it)."""
    return json.dumps(render_tfvars(catalog), indent=2) + "\n"


def write_tfvars(catalog: Catalog, path: str | Path) -> Path:
    """Write the pools of ``catalog`` to ``path`` (a ``*.auto.tfvars.json``); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tfvars_text(catalog))
    return path
