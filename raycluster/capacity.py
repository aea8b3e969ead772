"""What one node of a pool really offers Ray workers, and so how many fit.

A node's GPU units are not its only limit. The kubelet keeps back ``kube-reserved`` and
``system-reserved`` and a hard-eviction threshold (``allocatable`` is what is left), the
DaemonSets rayplane installs take their requests out of that on every node, and every meshed
Ray pod carries a Linkerd proxy. What is left holds workers up to the fewest of GPU units, CPU,
memory and pods; GPU units beyond that are *stranded*: paid for, never scheduled.

The formulas are the EKS AMI's (``nodeadm`` on AL2023, ``bootstrap.sh`` on AL2), which
Karpenter copies to decide whether a pending pod fits an instance type before it launches one:

- kube-reserved CPU: 6% of the first core, 1% of the second, 0.5% of the third and fourth,
  0.25% of every core above four;
- kube-reserved memory: 11 MiB x max pods + 255 MiB;
- system-reserved: none (the AMIs set none; OS daemons live in the VM overhead below);
- eviction-hard ``memory.available``: 100 MiB;
- max pods: the VPC CNI's ENI limit (``hardware.yaml``), or ``kubelet.maxPods`` where
  rayplane sets it (Karpenter's GPU nodes: ``KARPENTER_MAX_PODS``);
- memory: an instance reports less than EC2 advertises (kernel, firmware); Karpenter assumes
  ``vmMemoryOverheadPercent`` 7.5% until a node of the type has registered, so a worker that
  needs more never gets a node launched for it.

A namespace's share of the pools is its ``Quota``: GPU units per extended resource name, as the
ResourceQuota admission counts them (never a sum across names).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from raycluster.hardware import InstanceType, hardware
from raycluster.spec import Spec

if TYPE_CHECKING:
    from raycluster.catalog import Pool

#: Karpenter's default ``vmMemoryOverheadPercent``: share of EC2's memory a node will not report.
VM_MEMORY_OVERHEAD = 0.075
#: The kubelet's hard-eviction threshold on the EKS AMIs (``memory.available<100Mi``).
EVICTION_HARD_MEMORY_MI = 100
#: ``kubelet.maxPods`` of the Karpenter GPU nodes (raycluster.karpenter's EC2NodeClass): a GPU
#: node runs a few dozen pods, and kube-reserved memory grows with max pods.
KARPENTER_MAX_PODS = 110
#: The Linkerd proxy every meshed pod carries (namespaces inject it; as a native sidecar its
#: requests add to the pod's): ``proxy.resources`` of infra/helm/linkerd/control-plane-values.yaml.
MESH_PROXY_CPU_M = 100
MESH_PROXY_MEMORY_MI = 64


@dataclass(frozen=True)
class Resources:
    """CPU (millicores), memory (MiB) and pods."""

    cpu_m: int
    memory_mi: int
    pods: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu_m + other.cpu_m, self.memory_mi + other.memory_mi,
                         self.pods + other.pods)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu_m - other.cpu_m, self.memory_mi - other.memory_mi,
                         self.pods - other.pods)


class RunsOn(StrEnum):
    every_node = "every node"
    gpu_nodes = "GPU nodes"
    mig_capable = "GPU nodes whose GPUs can make MIG instances"
    efa_nodes = "pools with efa: true"


@dataclass(frozen=True)
class DaemonSet:
    name: str
    installed_by: str
    runs_on: RunsOn
    cpu_m: int
    memory_mi: int


#: The DaemonSets on rayplane's nodes and the requests budgeted for each: one table, used for
#: every pool's capacity. EKS add-ons keep their own requests; for the charts rayplane installs
#: these are the requests their values set (a chart that ships none would leave the scheduler
#: counting nothing for a pod that uses this much).
DAEMONSETS: tuple[DaemonSet, ...] = (
    DaemonSet("aws-node", "EKS add-on vpc-cni (with the network policy agent)",
              RunsOn.every_node, 50, 128),
    DaemonSet("kube-proxy", "EKS add-on kube-proxy", RunsOn.every_node, 100, 64),
    DaemonSet("ebs-csi-node", "EKS add-on aws-ebs-csi-driver", RunsOn.every_node, 30, 120),
    DaemonSet("efs-csi-node", "EKS add-on aws-efs-csi-driver", RunsOn.every_node, 30, 120),
    DaemonSet("linkerd-cni", "Helm chart linkerd2-cni", RunsOn.every_node, 20, 32),
    DaemonSet("node-exporter", "Helm chart kube-prometheus-stack", RunsOn.every_node, 50, 64),
    DaemonSet("gpu-operator-node-feature-discovery-worker", "Helm chart gpu-operator",
              RunsOn.every_node, 5, 64),
    DaemonSet("nvidia-device-plugin-daemonset", "GPU Operator", RunsOn.gpu_nodes, 50, 128),
    DaemonSet("gpu-feature-discovery", "GPU Operator", RunsOn.gpu_nodes, 20, 64),
    DaemonSet("nvidia-dcgm-exporter", "GPU Operator", RunsOn.gpu_nodes, 100, 512),
    DaemonSet("nvidia-operator-validator", "GPU Operator", RunsOn.gpu_nodes, 10, 32),
    DaemonSet("nvidia-node-status-exporter", "GPU Operator", RunsOn.gpu_nodes, 10, 32),
    DaemonSet("nvidia-mig-manager", "GPU Operator", RunsOn.mig_capable, 50, 128),
    DaemonSet("aws-efa-k8s-device-plugin", "Helm chart aws-efa-k8s-device-plugin",
              RunsOn.efa_nodes, 10, 20),
)


def kube_reserved_cpu_m(vcpus: int) -> int:
    """The EKS AMI's tiered kube-reserved CPU, in millicores."""
    tiers = ((1, 60.0), (1, 10.0), (2, 5.0))  # (cores, millicores per core)
    reserved, left = 0.0, vcpus
    for cores, per_core in tiers:
        take = min(cores, left)
        reserved += take * per_core
        left -= take
    reserved += left * 2.5
    return math.ceil(reserved)


def kube_reserved_memory_mi(max_pods: int) -> int:
    """The EKS AMI's kube-reserved memory, in MiB: 11 MiB per pod it may run, plus 255."""
    return 11 * max_pods + 255


def daemonsets_on(*, gpu: bool, mig_capable: bool, efa: bool) -> list[DaemonSet]:
    runs = {RunsOn.every_node}
    if gpu:
        runs.add(RunsOn.gpu_nodes)
    if gpu and mig_capable:
        runs.add(RunsOn.mig_capable)
    if efa:
        runs.add(RunsOn.efa_nodes)
    return [d for d in DAEMONSETS if d.runs_on in runs]


@dataclass(frozen=True)
class NodeBudget:
    """One node of an instance type: what it reports, what the kubelet keeps back, what the
    DaemonSets take, and what is left for Ray workers (``free``)."""

    instance_type: str
    capacity: Resources
    kube_reserved: Resources
    system_reserved: Resources
    eviction: Resources
    daemonsets: tuple[DaemonSet, ...]

    @property
    def allocatable(self) -> Resources:
        """The node's ``status.allocatable``, as the kubelet will report it."""
        return self.capacity - self.kube_reserved - self.system_reserved - self.eviction

    @property
    def daemonset_requests(self) -> Resources:
        return Resources(sum(d.cpu_m for d in self.daemonsets),
                         sum(d.memory_mi for d in self.daemonsets), len(self.daemonsets))

    @property
    def free(self) -> Resources:
        """What is left for workers once every DaemonSet pod is scheduled."""
        return self.allocatable - self.daemonset_requests


def node_budget(instance_type: str, *, gpu: bool, mig_capable: bool, efa: bool,
                kubelet_max_pods: int | None = None, node: InstanceType | None = None
                ) -> NodeBudget:
    """The budget of one node of ``instance_type`` with the DaemonSets its kind of pool runs.
    ``kubelet_max_pods`` is the kubelet's ``maxPods`` where rayplane sets it; the pods a node
    takes are the fewer of that and the VPC CNI's ENI limit (a pod needs an address).
    ``node``: the type's facts when it is not in the hardware table."""
    node = node or hardware().instance_types[instance_type]
    max_pods = kubelet_max_pods or node.max_pods
    memory_mi = math.floor(node.memory_gib * 1024 * (1 - VM_MEMORY_OVERHEAD))
    return NodeBudget(
        instance_type=instance_type,
        capacity=Resources(node.vcpus * 1000, memory_mi, min(max_pods, node.max_pods)),
        kube_reserved=Resources(kube_reserved_cpu_m(node.vcpus),
                                kube_reserved_memory_mi(max_pods)),
        system_reserved=Resources(0, 0),
        eviction=Resources(0, EVICTION_HARD_MEMORY_MI),
        daemonsets=tuple(daemonsets_on(gpu=gpu, mig_capable=mig_capable, efa=efa)))


def pod_request(cpus: float, memory_gib: float, *, meshed: bool = True) -> Resources:
    """What the scheduler counts for one Ray pod of ``cpus`` / ``memory_gib``: its container
    and, when its namespace is meshed, the Linkerd proxy."""
    proxy = Resources(MESH_PROXY_CPU_M, MESH_PROXY_MEMORY_MI) if meshed else Resources(0, 0)
    return Resources(math.ceil(cpus * 1000), math.ceil(memory_gib * 1024), 1) + proxy


@dataclass(frozen=True)
class Fit:
    """How many workers of one shape a node holds, and what stops more."""

    workers: int
    #: Workers each resource alone would allow: ``GPU units``, ``CPU``, ``memory``, ``pods``.
    limits: dict[str, int]
    gpu_units_per_node: int
    gpu_units_per_worker: int

    @property
    def binding(self) -> str:
        """The resource that runs out first (GPU units win a tie: nothing is stranded)."""
        return min(self.limits, key=lambda k: (self.limits[k], k != "GPU units"))

    @property
    def stranded_units(self) -> int:
        """GPU units of a node no worker can take: paid for, never scheduled."""
        return self.gpu_units_per_node - self.workers * self.gpu_units_per_worker


def fit(budget: NodeBudget, *, gpu_units_per_node: int, gpu_units: int, cpus: float,
        memory_gib: float) -> Fit:
    """How many pods of one worker shape fit on a node of ``budget``."""
    pod = pod_request(cpus, memory_gib)
    free = budget.free
    limits = {"CPU": max(0, free.cpu_m // pod.cpu_m),
              "memory": max(0, free.memory_mi // pod.memory_mi),
              "pods": max(0, free.pods)}
    if gpu_units:
        limits["GPU units"] = gpu_units_per_node // gpu_units
    return Fit(workers=min(limits.values()), limits=limits,
               gpu_units_per_node=gpu_units_per_node, gpu_units_per_worker=gpu_units)


# -- a namespace's quota -------------------------------------------------------------------

_QUANTITY = re.compile(r"^(\d+(\.\d+)?)(Ki|Mi|Gi|Ti)?$")


class Quota(Spec):
    gpus: dict[str, int] = Field(default_factory=dict, description=(
        "GPU units the namespace may request, per extended resource: {nvidia.com/gpu: 20, "
        "nvidia.com/mig-3g.40gb: 8}. Kubernetes enforces a quota per resource name, never a sum "
        "across names; a GPU resource of the catalog not named here gets 0."))
    cpus: int = Field(ge=0, description="CPU cores the namespace may request.")
    memory: str = Field(description="Memory the namespace may request (Kubernetes quantity).")

    @field_validator("gpus", mode="before")
    @classmethod
    def _per_resource(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError("one number would allow that many units of each GPU resource (a "
                             "ResourceQuota counts each resource name on its own); give units per "
                             "resource: {nvidia.com/gpu: N, nvidia.com/mig-3g.40gb: M}")
        return v

    @field_validator("gpus")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        for name, units in v.items():
            if units < 0:
                raise ValueError(f"{name}: {units} units; valid: 0 or more")
        return v

    @field_validator("memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        if not _QUANTITY.match(v):
            raise ValueError("must be a Kubernetes quantity such as 640Gi")
        return v

    @property
    def memory_gib(self) -> float:
        m = _QUANTITY.match(self.memory)
        assert m
        scale = {"Ki": 1 / 1024**2, "Mi": 1 / 1024, "Gi": 1, "Ti": 1024, None: 1 / 1024**3}
        return float(m[1]) * scale[m[3]]

    def gpu_units(self, resource: str | None) -> int:
        """Units of ``resource`` the namespace may request (0 for a resource it does not name)."""
        return self.gpus.get(resource, 0) if resource else 0


# -- a pool's nodes ------------------------------------------------------------------------


def pool_budgets(pool: Pool) -> list[NodeBudget]:
    """One budget per instance type of the pool. GPU pools are Karpenter's (kubelet maxPods
    ``KARPENTER_MAX_PODS``); the cpu pool is a managed node group on the AMI's ENI limit."""
    model = pool.gpu_model
    return [node_budget(name, gpu=pool.has_gpu, mig_capable=bool(model and model.supports_mig),
                        efa=pool.efa, kubelet_max_pods=KARPENTER_MAX_PODS if pool.has_gpu else None)
            for name in pool.instance_types]


def pool_fit(pool: Pool, *, gpu_units: int, cpus: float, memory_gib: float) -> Fit:
    """Workers of a shape per node of the pool: on its smallest instance type (Karpenter or
    the node group may launch any of them)."""
    fits = [fit(b, gpu_units_per_node=pool.gpu_units_per_node, gpu_units=gpu_units, cpus=cpus,
                memory_gib=memory_gib) for b in pool_budgets(pool)]
    return min(fits, key=lambda f: f.workers)


def standing_nodes(pool: Pool) -> int | None:
    """The nodes a MIG pool keeps standing (its ``desired_nodes``, default ``min_nodes``), or
    None for a pool that scales with demand. Karpenter launches a node only for resources an
    instance type offers, and ``nvidia.com/mig-*`` exists only once the MIG manager has cut the
    node's GPUs: a MIG pool is a static NodePool (raycluster.karpenter) and never grows past
    these, whatever its ``max_nodes`` (then only the bound on a replacement's surge)."""
    if pool.sharing.mode != "mig":
        return None
    return pool.min_nodes if pool.desired_nodes is None else pool.desired_nodes


def schedulable_nodes(pool: Pool) -> int:
    """How many nodes a pool's workers can ever be spread over: its standing nodes when it
    has them, else ``max_nodes``."""
    standing = standing_nodes(pool)
    return pool.max_nodes if standing is None else standing


def misfit(pool: Pool, *, gpu_units: int, cpus: float, memory_gib: float) -> tuple[str, str] | None:
    """Why not even one worker of this shape fits a node of the pool, as (field, reason), the
    field relative to the worker (``cpus``, ``memory_gib``, ``gpu_units``); None when it fits."""
    budgets = pool_budgets(pool)
    for budget in budgets:
        f = fit(budget, gpu_units_per_node=pool.gpu_units_per_node, gpu_units=gpu_units,
                cpus=cpus, memory_gib=memory_gib)
        if f.workers:
            continue
        free, pod = budget.free, pod_request(cpus, memory_gib)
        where = (f"a {budget.instance_type} node of pool {pool.name!r}, after kube-reserved, "
                 "eviction threshold and DaemonSets")
        if f.limits.get("GPU units", 1) == 0:
            return "gpu_units", (f"{gpu_units} GPU units are more than {where[2:]} holds "
                                 f"({pool.gpu_units_per_node})")
        if f.limits["CPU"] == 0:
            return "cpus", (f"{cpus:g} CPUs ({pod.cpu_m / 1000:g} with the Linkerd proxy) do not "
                            f"fit {where}: {free.cpu_m / 1000:g} CPUs are left")
        if f.limits["memory"] == 0:
            return "memory_gib", (f"{memory_gib:g} GiB ({pod.memory_mi / 1024:.2f} with the "
                                  f"Linkerd proxy) does not fit {where}: "
                                  f"{free.memory_mi / 1024:.1f} GiB are left")
        return "cpus", f"no pod fits {where}: {free.pods} pods are left"
    return None


__all__ = ["DAEMONSETS", "Quota", "EVICTION_HARD_MEMORY_MI", "KARPENTER_MAX_PODS", "MESH_PROXY_CPU_M",
           "MESH_PROXY_MEMORY_MI", "VM_MEMORY_OVERHEAD", "DaemonSet", "Fit", "NodeBudget",
           "Resources", "RunsOn", "daemonsets_on", "fit", "kube_reserved_cpu_m",
           "kube_reserved_memory_mi", "misfit", "node_budget", "pod_request", "pool_budgets",
           "pool_fit", "schedulable_nodes", "standing_nodes"]
