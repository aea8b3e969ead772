"""The pool catalog: the platform's node pools, priority classes and namespace quotas, declared
once (``data/pools.yaml``). Everything else -- Terraform node groups, the GPU Operator's
time-slicing and MIG config, KubeRay worker groups, Ray custom resources, the local emulation
-- is derived from it. The derived numbers (schedulable GPU units, memory per unit, the
Kubernetes resource name, the Ray resources) are computed here and nowhere else; workers per
node, after what the kubelet and the DaemonSets keep, in ``raycluster.capacity``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from raycluster.capacity import Fit, Quota, misfit, pool_fit, schedulable_nodes
from raycluster.hardware import (
    GPUModel,
    InstanceType,
    MigProfile,
    gpu_model,
    hardware,
    mig_layout_name,
)
from raycluster.spec import Spec, SpecError, did_you_mean

DEFAULT_CATALOG = Path(__file__).parent / "data" / "pools.yaml"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                            r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

#: Prefix of the Ray custom resource every worker of a pool advertises: ``pool:a100-mig``.
POOL_RESOURCE_PREFIX = "pool:"
#: Label the GPU Operator's MIG manager reads to choose a node's MIG layout.
MIG_CONFIG_LABEL = "nvidia.com/mig.config"
#: Label the device plugin reads to choose a named entry of its config (time-slicing).
DEVICE_PLUGIN_CONFIG_LABEL = "nvidia.com/device-plugin.config"


class SharingMode(StrEnum):
    none = "none"
    time_slicing = "time-slicing"
    mig = "mig"


class CapacityType(StrEnum):
    on_demand = "ON_DEMAND"
    spot = "SPOT"


class TaintEffect(StrEnum):
    no_schedule = "NoSchedule"
    prefer_no_schedule = "PreferNoSchedule"
    no_execute = "NoExecute"


class Taint(Spec):
    key: str = Field(description="Taint key, e.g. nvidia.com/gpu.")
    value: str = Field(default="", description="Taint value.")
    effect: TaintEffect = Field(description="What the taint does to pods that don't tolerate it.")

    def toleration(self) -> dict:
        return {"key": self.key, "operator": "Equal", "value": self.value,
                "effect": self.effect.value}


class GPUSharing(Spec):
    mode: SharingMode = Field(default=SharingMode.none,
                              description="How one physical GPU is shared between pods.")
    replicas: int | None = Field(default=None,
                                 description="time-slicing: pods that share one GPU (>= 1).")
    mig_profile: str | None = Field(default=None,
                                    description="mig: the profile every GPU of the node is cut "
                                                "into, e.g. 3g.40gb.")

    @model_validator(mode="after")
    def _fields_match_mode(self) -> GPUSharing:
        if self.mode is SharingMode.time_slicing:
            if self.replicas is None:
                raise ValueError("replicas is required when mode is 'time-slicing'")
            if self.replicas < 1:
                raise ValueError(f"replicas must be >= 1 for time-slicing, got {self.replicas}")
            if self.mig_profile is not None:
                raise ValueError("mig_profile is only valid when mode is 'mig'")
        elif self.mode is SharingMode.mig:
            if self.mig_profile is None:
                raise ValueError("mig_profile is required when mode is 'mig'")
            if self.replicas is not None:
                raise ValueError("replicas is only valid when mode is 'time-slicing'")
        elif self.replicas is not None or self.mig_profile is not None:
            raise ValueError("replicas and mig_profile need mode 'time-slicing' or 'mig'")
        return self


class WorkerShape(Spec):
    """One Ray worker pod of the pool (a KubeRay worker group's container), and so one Ray node."""

    gpu_units: int = Field(default=0, ge=0, description="GPU units (whole GPUs, time-slice "
                                                        "replicas or MIG instances) per worker.")
    cpus: int = Field(ge=1, description="CPU cores requested per worker.")
    memory_gib: int = Field(ge=1, description="Memory requested per worker, GiB.")


class Pool(Spec):
    name: str = Field(description="Pool name (a DNS label): node group, worker group, Ray resource.")
    description: str = Field(default="", description="What the pool is for.")
    instance_types: list[str] = Field(min_length=1, description="EC2 instance types (one GPU "
                                                                "model and count across them).")
    capacity_type: CapacityType = Field(default=CapacityType.on_demand,
                                        description="ON_DEMAND or SPOT nodes.")
    min_nodes: int = Field(default=0, ge=0, description="Fewest nodes in the node group.")
    max_nodes: int = Field(ge=0, description="Most nodes in the node group.")
    desired_nodes: int | None = Field(default=None, ge=0,
                                      description="Nodes at creation (default: min_nodes).")
    disk_size_gib: int = Field(default=200, ge=20, description="Root volume size, GiB.")
    sharing: GPUSharing = Field(default_factory=GPUSharing, description="GPU sharing of the pool.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra node labels.")
    taints: list[Taint] = Field(default_factory=list, description="Node taints.")
    worker: WorkerShape = Field(description="Shape of one Ray worker pod on this pool.")
    efa: bool = Field(default=False, description="Attach EFA interfaces to the pool's nodes "
                                                 "(multi-node NCCL training on p4d/p5).")
    priority_class: str = Field(description="Default priority class of work on this pool.")
    namespace: str = Field(description="Namespace whose workloads run on this pool by default.")

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError("must be a DNS label: lowercase letters, digits and '-', "
                             "at most 63 characters")
        return v

    @field_validator("instance_types")
    @classmethod
    def _known_instance_types(cls, v: list[str]) -> list[str]:
        known = hardware().instance_types
        for i, name in enumerate(v):
            if name not in known:
                raise ValueError(f"instance type {name!r} (item {i}) is not in the hardware "
                                 f"table{did_you_mean(name, known)}; known: {', '.join(known)}")
        shapes = {(known[n].gpus, known[n].gpu_model) for n in v}
        if len(shapes) > 1:
            raise ValueError(f"instance types {v} differ in GPU model or count; a pool's nodes "
                             "must be interchangeable")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Pool:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) is greater than max_nodes "
                             f"({self.max_nodes})")
        desired = self.desired_nodes
        if desired is not None and not self.min_nodes <= desired <= self.max_nodes:
            raise ValueError(f"desired_nodes ({desired}) must lie between min_nodes "
                             f"({self.min_nodes}) and max_nodes ({self.max_nodes})")
        node = self.instance
        if node.gpus and self.max_nodes == 0:  # Karpenter would never launch one of its nodes
            raise ValueError("max_nodes: 0 on a GPU pool holds no worker; valid: 1 or more")
        if node.gpus == 0 and self.sharing.mode is not SharingMode.none:
            raise ValueError(f"sharing.mode: {self.sharing.mode.value!r} needs a GPU instance "
                             f"type; {self.instance_types[0]} has no GPU")
        if self.sharing.mode is SharingMode.mig:
            model = self.gpu_model
            assert model is not None
            profiles = model.mig_profiles
            if self.sharing.mig_profile not in profiles:
                valid = ", ".join(profiles) or "none (the model has no MIG)"
                raise ValueError(
                    f"sharing.mig_profile: {self.sharing.mig_profile!r} is not a MIG profile of "
                    f"{model.name} ({self.instance_types[0]}){did_you_mean(self.sharing.mig_profile, profiles)}; "
                    f"valid: {valid}")
        no_efa = [t for t in self.instance_types if not hardware().instance_types[t].efa]
        if self.efa and no_efa:
            raise ValueError(f"efa: true but instance type {no_efa[0]} has no EFA support")
        if self.worker.gpu_units > self.gpu_units_per_node:
            raise ValueError(f"worker.gpu_units: {self.worker.gpu_units} is more than a node of "
                             f"the pool holds ({self.gpu_units_per_node} units on "
                             f"{self.instance_types[0]})")
        if node.gpus and self.worker.gpu_units == 0:
            raise ValueError("worker.gpu_units: a GPU pool's worker must take at least 1 unit")
        w = self.worker
        bad = misfit(self, gpu_units=w.gpu_units, cpus=w.cpus, memory_gib=w.memory_gib)
        if bad:
            raise ValueError(f"worker.{bad[0]}: {bad[1]}")
        return self

    # -- derived, never typed ------------------------------------------------------------

    @property
    def instance(self) -> InstanceType:
        return hardware().instance_types[self.instance_types[0]]

    @property
    def gpu_model(self) -> GPUModel | None:
        name = self.instance.gpu_model
        return gpu_model(name) if name else None

    @property
    def has_gpu(self) -> bool:
        return self.instance.gpus > 0

    @property
    def gpus_per_node(self) -> int:
        return self.instance.gpus

    @property
    def mig_profile(self) -> MigProfile | None:
        model = self.gpu_model
        if self.sharing.mode is not SharingMode.mig or model is None:
            return None
        return model.mig_profiles[self.sharing.mig_profile]

    @property
    def units_per_gpu(self) -> int:
        """Schedulable units one physical GPU becomes."""
        if self.sharing.mode is SharingMode.time_slicing:
            return self.sharing.replicas or 1
        if self.sharing.mode is SharingMode.mig:
            return self.mig_profile.instances_per_gpu  # type: ignore[union-attr]
        return 1 if self.has_gpu else 0

    @property
    def gpu_units_per_node(self) -> int:
        """Schedulable GPU units per node: GPUs x replicas, or MIG instances per GPU x GPUs."""
        return self.gpus_per_node * self.units_per_gpu

    @property
    def memory_per_unit_gb(self) -> float:
        """GPU memory one unit may use. MIG: the profile's (hard limit). Time-slicing: an equal
        share of the GPU (nothing enforces it, so rayplane sets it for vLLM and torch)."""
        model = self.gpu_model
        if model is None:
            return 0.0
        if self.sharing.mode is SharingMode.mig:
            return float(self.mig_profile.memory_gb)  # type: ignore[union-attr]
        return model.memory_gb / self.units_per_gpu

    @property
    def gpu_fraction_per_unit(self) -> float:
        """Fraction of one physical GPU's memory a unit may take (vLLM's
        ``gpu_memory_utilization`` is relative to what the process sees: for MIG that is the
        instance, so 1.0; for time-slicing the whole GPU, so 1/replicas)."""
        if not self.has_gpu:
            return 0.0
        if self.sharing.mode is SharingMode.time_slicing:
            return 1.0 / (self.sharing.replicas or 1)
        return 1.0

    @property
    def kubernetes_resource(self) -> str | None:
        """Extended resource a worker container requests: ``nvidia.com/gpu`` (whole GPUs and
        time-slice replicas, with renamed resources off) or ``nvidia.com/mig-3g.40gb``."""
        if not self.has_gpu:
            return None
        if self.sharing.mode is SharingMode.mig:
            return self.mig_profile.resource_name  # type: ignore[union-attr]
        return "nvidia.com/gpu"

    @property
    def ray_resource(self) -> str:
        """The custom resource that marks work for this pool: ``pool:<name>``."""
        return f"{POOL_RESOURCE_PREFIX}{self.name}"

    def ray_resources(self, workers: int = 1) -> dict[str, float]:
        """Custom resources ``workers`` Ray workers of this pool advertise (``rayStartParams``
        ``resources`` on KubeRay, ``ray start --resources`` locally). The pool resource counts
        GPU units on GPU pools and CPUs on CPU pools, so a task asking ``{"pool:x": 1}`` takes
        one unit of that pool's capacity."""
        per_worker = self.worker.gpu_units if self.has_gpu else self.worker.cpus
        return {self.ray_resource: float(per_worker * workers)}

    @property
    def node_labels(self) -> dict[str, str]:
        """Labels every node of the pool carries: the pool's own, the pool name, and the GPU
        Operator labels that choose its time-slicing or MIG config."""
        labels = {"rayplane.io/pool": self.name, **self.labels}
        if self.sharing.mode is SharingMode.time_slicing:
            labels[DEVICE_PLUGIN_CONFIG_LABEL] = self.device_plugin_config_name
        elif self.sharing.mode is SharingMode.mig:
            labels[MIG_CONFIG_LABEL] = mig_layout_name(self.sharing.mig_profile or "")
        return labels

    @property
    def device_plugin_config_name(self) -> str:
        """Name of this pool's entry in the device plugin's config map (time-slicing)."""
        return f"time-slicing-{self.sharing.replicas}"

    @property
    def node_selector(self) -> dict[str, str]:
        return {"rayplane.io/pool": self.name}

    @property
    def workers_per_node(self) -> int:
        """How many workers of this pool's own shape (``worker``) fit on one node."""
        return self.workers_per_node_of(gpu_units=self.worker.gpu_units, cpus=self.worker.cpus,
                                        memory_gib=self.worker.memory_gib)

    def workers_per_node_of(self, *, gpu_units: int, cpus: float, memory_gib: float) -> int:
        """How many workers of a given shape fit on one node of this pool: the fewest its GPU
        units, and its CPU, memory and pods after kube-reserved, the eviction threshold and the
        DaemonSets allow (``raycluster.capacity``). A worker group sized differently from the
        pool's worker counts with this."""
        return self.fit_of(gpu_units=gpu_units, cpus=cpus, memory_gib=memory_gib).workers

    def fit_of(self, *, gpu_units: int, cpus: float, memory_gib: float) -> Fit:
        """Workers of a shape per node, the resource that binds and the stranded GPU units."""
        return pool_fit(self, gpu_units=gpu_units if self.has_gpu else 0, cpus=cpus,
                        memory_gib=memory_gib)

    @property
    def fit(self) -> Fit:
        """``fit_of`` the pool's own worker shape."""
        w = self.worker
        return self.fit_of(gpu_units=w.gpu_units, cpus=w.cpus, memory_gib=w.memory_gib)

    @property
    def max_workers(self) -> int:
        return self.workers_per_node * schedulable_nodes(self)


class PriorityClass(Spec):
    name: str = Field(description="PriorityClass name (a DNS subdomain).")
    value: int = Field(ge=0, le=1_000_000_000, description="Priority (higher preempts lower).")
    description: str = Field(default="", description="What it is for.")
    preempting: bool = Field(default=True, description="Whether pods of this class preempt.")

    @field_validator("name")
    @classmethod
    def _dns_subdomain(cls, v: str) -> str:
        if not _DNS_SUBDOMAIN.match(v):
            raise ValueError("must be a DNS subdomain: lowercase letters, digits, '-' and '.', "
                             "at most 253 characters")
        return v


class Namespace(Spec):
    name: str = Field(description="Kubernetes namespace (a DNS label).")
    purpose: str = Field(default="", description="What runs there.")
    quota: Quota | None = Field(default=None, description="ResourceQuota of the namespace.")
    default_priority_class: str | None = Field(default=None,
                                               description="Priority class of its workloads.")
    priority_classes: list[str] = Field(default_factory=list, description=(
        "Priority classes its pods may use besides the default (a quota scope refuses others)."))

    @property
    def allowed_priority_classes(self) -> list[str]:
        """The default class first, then the others the namespace may use."""
        first = [self.default_priority_class] if self.default_priority_class else []
        return first + [c for c in self.priority_classes if c not in first]

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError("must be a DNS label: lowercase letters, digits and '-', "
                             "at most 63 characters")
        return v


class Catalog(Spec):
    spec_kind = "pools file"
    pools: list[Pool] = Field(min_length=1, description="Node pools.")
    priority_classes: list[PriorityClass] = Field(default_factory=list,
                                                  description="Kubernetes PriorityClasses.")
    namespaces: list[Namespace] = Field(default_factory=list, description="Platform namespaces.")

    @model_validator(mode="after")
    def _cross_references(self) -> Catalog:
        _unique("pools", [p.name for p in self.pools])
        _unique("priority_classes", [p.name for p in self.priority_classes])
        _unique("namespaces", [n.name for n in self.namespaces])
        classes = {p.name for p in self.priority_classes}
        namespaces = {n.name for n in self.namespaces}
        cpu_pools = [p for p in self.pools if not p.has_gpu]
        if not cpu_pools:
            raise ValueError("pools: at least one CPU pool is needed for Ray head nodes")
        for i, pool in enumerate(self.pools):
            if classes and pool.priority_class not in classes:
                raise ValueError(f"pools[{i}].priority_class: {pool.priority_class!r} is not a "
                                 f"priority class{did_you_mean(pool.priority_class, classes)}; "
                                 f"valid: {', '.join(sorted(classes))}")
            if namespaces and pool.namespace not in namespaces:
                raise ValueError(f"pools[{i}].namespace: {pool.namespace!r} is not a namespace"
                                 f"{did_you_mean(pool.namespace, namespaces)}; valid: "
                                 f"{', '.join(sorted(namespaces))}")
        gpu_resources = sorted({p.kubernetes_resource for p in self.gpu_pools
                                if p.kubernetes_resource})
        for i, ns in enumerate(self.namespaces):
            named = [("default_priority_class", ns.default_priority_class)] if (
                ns.default_priority_class) else []
            named += [(f"priority_classes[{j}]", c) for j, c in enumerate(ns.priority_classes)]
            for where, name in named:
                if classes and name not in classes:
                    raise ValueError(f"namespaces[{i}].{where}: {name!r} is not a priority class"
                                     f"{did_you_mean(name, classes)}; valid: "
                                     f"{', '.join(sorted(classes))}")
            for res in (ns.quota.gpus if ns.quota else {}):
                if res not in gpu_resources:
                    raise ValueError(f"namespaces[{i}].quota.gpus: {res!r} is not a GPU resource "
                                     f"of the catalog's pools{did_you_mean(res, gpu_resources)}; "
                                     f"valid: {', '.join(gpu_resources) or 'none (no GPU pool)'}")
        return self

    @cached_property
    def by_name(self) -> dict[str, Pool]:
        return {p.name: p for p in self.pools}

    def pool(self, name: str, field: str = "pool") -> Pool:
        """The pool called ``name``, or a SpecError naming ``field`` and the valid pools."""
        if name not in self.by_name:
            raise SpecError(f"{field}: {name!r} is not a pool{did_you_mean(name, self.by_name)}; "
                            f"valid: {', '.join(self.by_name)}", field=field)
        return self.by_name[name]

    @property
    def head_pool(self) -> Pool:
        """Ray head nodes run on the first CPU pool."""
        return next(p for p in self.pools if not p.has_gpu)

    @property
    def gpu_pools(self) -> list[Pool]:
        return [p for p in self.pools if p.has_gpu]

    def namespace(self, name: str) -> Namespace:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        raise SpecError(f"namespace: {name!r} is not a namespace of the catalog; valid: "
                        f"{', '.join(n.name for n in self.namespaces)}", field="namespace")


def _unique(field: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}[{i}].name: duplicate name {name!r}; names must be unique")
        seen.add(name)


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The catalog at ``path`` (default: the platform's ``data/pools.yaml``)."""
    return Catalog.from_file(path or DEFAULT_CATALOG)
