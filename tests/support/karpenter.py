"""Karpenter's scheduling simulation, on paper: which NodePool gives a pending pod a node
(labels and `In` requirements against the pod's node selector and required node affinity,
taints against its tolerations, then its requests): a dynamic NodePool launches one when an
instance type fits the pod as Karpenter sees it (the instance type alone: a p4d is
`nvidia.com/gpu: 8`); a static NodePool (spec.replicas) launches for no pod, and the pod must
fit one of its standing nodes as the GPU Operator configures them (the device plugin's
time-slicing and the MIG manager's layout, read from the rendered ConfigMaps). Also: how many
nodes a NodePool's limits admit, and the CEL rules of the Karpenter CRDs that jsonschema
cannot run. Formulas as karpenter-provider-aws / karpenter v1.14.1 have them
(pkg/providers/instancetype/types.go; state.StateNode.Capacity, scheduler
filterByRemainingResources)."""

from __future__ import annotations

import math
import re

import yaml

from raycluster import gpu_operator, karpenter
from raycluster.capacity import (
    EVICTION_HARD_MEMORY_MI,
    MESH_PROXY_CPU_M,
    MESH_PROXY_MEMORY_MI,
    VM_MEMORY_OVERHEAD,
    daemonsets_on,
    kube_reserved_cpu_m,
    kube_reserved_memory_mi,
)
from raycluster.catalog import Catalog
from raycluster.hardware import gpu_model, hardware
from tests.support.infra import pod_templates

RAY_KINDS = {"RayCluster", "RayService", "RayJob", "RayCronJob"}
MIB = 2.0**20
#: Labels every node Karpenter launches has a value for, whatever the NodePool says.
WELL_KNOWN = {"node.kubernetes.io/instance-type", "kubernetes.io/arch", "kubernetes.io/os",
              "karpenter.sh/capacity-type", "karpenter.sh/nodepool",
              "topology.kubernetes.io/zone", "topology.kubernetes.io/region"}


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (bytes, cores, units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    assert m, f"not a quantity: {value!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m[1]) * scale[m[2]]


def capacity(instance_type: str, node_class: dict,
             advertised: dict[str, float] | None = None) -> dict[str, float]:
    """An instance type's capacity as Karpenter computes it for this EC2NodeClass: vCPUs,
    memory less the VM overhead, NVIDIA GPUs, EFA (one per efa-only interface), pods (kubelet
    maxPods). ``advertised``: the GPU resources the node's kubelet reports once the GPU
    Operator has configured it, in place of the instance type's GPUs (None: Karpenter's view
    before launch)."""
    node = hardware().instance_types[instance_type]
    spec = node_class["spec"]
    out = {"cpu": float(node.vcpus),
           "memory": math.floor(node.memory_gib * 1024 * (1 - VM_MEMORY_OVERHEAD)) * MIB,
           "nvidia.com/gpu": float(node.gpus), "pods": float(spec["kubelet"]["maxPods"]),
           "vpc.amazonaws.com/efa": float(sum(1 for nic in spec.get("networkInterfaces", [])
                                              if nic["interfaceType"] == "efa-only"))}
    if advertised is not None:
        out.update(advertised)
    return out


def allocatable(instance_type: str, node_class: dict,
                advertised: dict[str, float] | None = None) -> dict[str, float]:
    """What a pending pod may take of a node: capacity less kube-reserved, the hard eviction
    threshold (raycluster.capacity's formulas, the ones Karpenter uses) and the DaemonSet pods
    on the node (raycluster.capacity's table)."""
    node = hardware().instance_types[instance_type]
    out = capacity(instance_type, node_class, advertised)
    model = gpu_model(node.gpu_model) if node.gpu_model else None
    daemonsets = daemonsets_on(gpu=node.gpus > 0, mig_capable=bool(model and model.supports_mig),
                               efa=out["vpc.amazonaws.com/efa"] > 0)
    out["cpu"] -= (kube_reserved_cpu_m(node.vcpus) + sum(d.cpu_m for d in daemonsets)) / 1000
    out["memory"] -= (kube_reserved_memory_mi(int(out["pods"])) + EVICTION_HARD_MEMORY_MI
                      + sum(d.memory_mi for d in daemonsets)) * MIB
    out["pods"] -= len(daemonsets)
    return out


def advertised_gpus(node_pool: dict, objects: list[dict]) -> dict[str, float] | None:
    """The GPU resources a node of this NodePool reports once the GPU Operator has read its
    labels: time-sliced ``nvidia.com/gpu`` (GPUs x replicas, from the device plugin config the
    node's label names) or the MIG layout's instances (mixed strategy: no whole
    ``nvidia.com/gpu`` left). None for a node without such a label (its GPUs stay whole)."""
    labels = node_pool["spec"]["template"]["metadata"].get("labels", {})
    types = next(r["values"] for r in node_pool["spec"]["template"]["spec"]["requirements"]
                 if r["key"] == "node.kubernetes.io/instance-type")
    gpus = min(hardware().instance_types[t].gpus for t in types)
    configs = {o["metadata"]["name"]: o["data"] for o in of_kind(objects, "ConfigMap")}
    if "nvidia.com/device-plugin.config" in labels:
        config = yaml.safe_load(configs[gpu_operator.DEVICE_PLUGIN_CONFIG]
                                [labels["nvidia.com/device-plugin.config"]])
        return {r["name"]: float(gpus * r["replicas"])
                for r in config["sharing"]["timeSlicing"]["resources"]}
    if "nvidia.com/mig.config" in labels:
        layouts = yaml.safe_load(configs[gpu_operator.MIG_PARTED_CONFIG]["config.yaml"])
        out = {"nvidia.com/gpu": 0.0}
        for entry in layouts["mig-configs"][labels["nvidia.com/mig.config"]]:
            assert entry["devices"] == "all" and entry["mig-enabled"], entry
            for profile, count in entry["mig-devices"].items():
                out[f"nvidia.com/mig-{profile}"] = float(gpus * count)
        return out
    return None


def node_values(pool: dict) -> dict[str, set[str]]:
    """The values a node of the NodePool may carry per label key: its template labels, its
    `In` requirements, and its own name under karpenter.sh/nodepool."""
    out = {k: {v} for k, v in pool["spec"]["template"]["metadata"].get("labels", {}).items()}
    for req in pool["spec"]["template"]["spec"]["requirements"]:
        assert req["operator"] == "In", "the test follows In requirements only"
        out[req["key"]] = out.get(req["key"], set(req["values"])) & set(req["values"])
    out[karpenter.NODEPOOL_LABEL] = {pool["metadata"]["name"]}
    return out


def expression_holds(expr: dict, values: dict[str, set[str]]) -> bool:
    key, op, wanted = expr["key"], expr["operator"], set(expr.get("values", []))
    have = values.get(key)
    if op == "In":
        # A custom label the NodePool does not define cannot be promised (Karpenter refuses).
        return bool(have & wanted) if have is not None else key in WELL_KNOWN
    if op == "NotIn":
        return have is None or bool(have - wanted)
    if op == "Exists":
        return have is not None or key in WELL_KNOWN
    if op == "DoesNotExist":
        return have is None and key not in WELL_KNOWN
    raise AssertionError(f"operator {op} not followed by this test")


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint["effect"]:
            continue
        if tol.get("operator") == "Exists" and tol.get("key") in (None, "", taint["key"]):
            return True
        if tol.get("key") == taint["key"] and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def requests(pod_spec: dict) -> dict[str, float]:
    """The pod's requests as the scheduler counts them: containers summed (with the mesh
    proxy), the largest init container if larger, and the pod itself."""
    # Every Ray namespace is meshed: Linkerd's injector adds its proxy before Karpenter sees
    # the pending pod.
    total: dict[str, float] = {"pods": 1.0, "cpu": MESH_PROXY_CPU_M / 1000,
                               "memory": MESH_PROXY_MEMORY_MI * MIB}
    for c in pod_spec["containers"]:
        for k, v in c.get("resources", {}).get("requests", {}).items():
            total[k] = total.get(k, 0.0) + quantity(v)
    for c in pod_spec.get("initContainers", []):
        for k, v in c.get("resources", {}).get("requests", {}).items():
            total[k] = max(total.get(k, 0.0), quantity(v))
    return total


def unselected(pod_spec: dict, pool: dict) -> str | None:
    """None when a node of the NodePool may take the pod by labels and taints; else why not."""
    values = node_values(pool)
    selector = [{"key": k, "operator": "In", "values": [v]}
                for k, v in pod_spec.get("nodeSelector", {}).items()]
    if not all(expression_holds(e, values) for e in selector):
        return "node selector"
    required = (pod_spec.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required and not any(all(expression_holds(e, values)
                                for e in term.get("matchExpressions", []))
                            for term in required["nodeSelectorTerms"]):
        return "required node affinity"
    for taint in pool["spec"]["template"]["spec"].get("taints", []):
        if taint["effect"] != "PreferNoSchedule" and \
                not tolerates(pod_spec.get("tolerations", []), taint):
            return f"taint {taint['key']}"
    return None


def unfit(pod_spec: dict, pool: dict, node_class: dict,
          advertised: dict[str, float] | None = None) -> str | None:
    """None when the pod's requests fit a node of one of the NodePool's instance types
    (Karpenter's view, or ``advertised`` GPU resources); else what each type lacks."""
    want = requests(pod_spec)
    misses = []
    for name in sorted(node_values(pool)["node.kubernetes.io/instance-type"]):
        alloc = allocatable(name, node_class, advertised)
        short = [k for k, v in want.items() if v > alloc.get(k, 0.0)]
        if not short:
            return None
        misses.append(f"{name} lacks {', '.join(short)}")
    return "; ".join(misses) or "no instance type"


def why_not_launched(pod_spec: dict, pool: dict, node_class: dict) -> str | None:
    """None when Karpenter, seeing the pod pending, launches a node of this NodePool for it
    (dynamic NodePools only: a static one launches for no pod)."""
    if "replicas" in pool["spec"]:
        return "static NodePool: Karpenter launches no node for a pending pod"
    return unselected(pod_spec, pool) or unfit(pod_spec, pool, node_class)


def why_not_standing(pod_spec: dict, pool: dict, node_class: dict,
                     objects: list[dict]) -> str | None:
    """None when the pod fits one of a static NodePool's standing nodes, as the GPU Operator
    configures it (its MIG layout or time-slicing)."""
    if not pool["spec"].get("replicas"):
        return "no standing nodes"
    return unselected(pod_spec, pool) or \
        unfit(pod_spec, pool, node_class, advertised_gpus(pool, objects))


def placements(pod_spec: dict, objects: list[dict]) -> dict[str, str | None]:
    """NodePool name -> None if it gives the pending pod a node (a dynamic one launches it, a
    static one has it standing), else why not."""
    classes = {c["metadata"]["name"]: c for c in of_kind(objects, "EC2NodeClass")}
    out = {}
    for pool in of_kind(objects, "NodePool"):
        node_class = classes[pool["spec"]["template"]["spec"]["nodeClassRef"]["name"]]
        out[pool["metadata"]["name"]] = \
            why_not_standing(pod_spec, pool, node_class, objects) if "replicas" in pool["spec"] \
            else why_not_launched(pod_spec, pool, node_class)
    return out


def workers_per_node(pod_spec: dict, instance_type: str, node_class: dict,
                     advertised: dict[str, float] | None = None) -> int:
    """How many such pods one node holds (Karpenter's view, or the configured node's)."""
    alloc = allocatable(instance_type, node_class, advertised)
    return min(math.floor(alloc.get(k, 0.0) / v) for k, v in requests(pod_spec).items() if v)


def ray_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    return [(where, t) for o in objects if o["kind"] in RAY_KINDS
            for where, t in pod_templates(o)]


def gpu_worker_pods(objects: list[dict], catalog: Catalog) -> list[tuple[str, str, dict]]:
    out = []
    for where, template in ray_pods(objects):
        pool = template["metadata"].get("labels", {}).get("rayplane.io/pool")
        if "workerGroupSpecs" in where and pool and catalog.pool(pool).has_gpu:
            out.append((where, pool, template))
    return out


def cel_errors(obj: dict) -> list[str]:
    """The CEL rules of the Karpenter CRDs that jsonschema cannot run, for the fields rayplane
    sets: restricted label domains, In with values, role xor instance profile, the AMI alias,
    EFA interfaces (a primary interface, unique card/device pairs, one EFA per card), a static
    NodePool's limits (nodes only) and weight (none)."""
    errors = []

    def key_ok(key: str) -> bool:
        domain = key.split("/")[0] if "/" in key else ""
        return key != "kubernetes.io/hostname" and key != karpenter.NODEPOOL_LABEL and \
            (key == karpenter.CAPACITY_TYPE_LABEL or not domain.endswith("karpenter.sh")) and \
            not domain.endswith("karpenter.k8s.aws")

    spec = obj["spec"]
    if obj["kind"] == "NodePool":
        template = spec["template"]
        keys = [*template["metadata"].get("labels", {}),
                *(r["key"] for r in template["spec"]["requirements"])]
        errors += [f"restricted label {k}" for k in keys if not key_ok(k)]
        errors += [f"In without values: {r['key']}" for r in template["spec"]["requirements"]
                   if r["operator"] == "In" and not r.get("values")]
        errors += ["budget schedule without duration"
                   for b in spec["disruption"].get("budgets", [])
                   if ("schedule" in b) != ("duration" in b)]
        if "replicas" in spec:
            errors += [f"static NodePool limits {k}" for k in spec.get("limits", {})
                       if k != "nodes"]
            errors += ["static NodePool with weight"] if "weight" in spec else []
    elif obj["kind"] == "EC2NodeClass":
        if ("role" in spec) == ("instanceProfile" in spec):
            errors.append("exactly one of role, instanceProfile")
        for term in spec["amiSelectorTerms"]:
            if "alias" in term:
                family, _, version = term["alias"].partition("@")
                if family not in {"al2", "al2023", "bottlerocket"} or not version:
                    errors.append(f"alias {term['alias']}")
                if len(term) > 1 or len(spec["amiSelectorTerms"]) > 1:
                    errors.append("alias is exclusive")
        nics = spec.get("networkInterfaces", [])
        if nics:
            if not any(n["interfaceType"] == "interface" for n in nics):
                errors.append("no primary interface")
            pairs = [(n["networkCardIndex"], n["deviceIndex"]) for n in nics]
            if len(set(pairs)) != len(pairs):
                errors.append("duplicate network card/device pair")
            efa_cards = [n["networkCardIndex"] for n in nics if n["interfaceType"] == "efa-only"]
            if len(set(efa_cards)) != len(efa_cards):
                errors.append("more than one EFA on a network card")
    return errors


def nodes_admitted(node_pool: dict, node_class: dict,
                   advertised: dict[str, float] | None) -> int:
    """How many nodes Karpenter launches before the NodePool's limits stop it, each launched
    once the ones before it are up. Karpenter counts a NodeClaim still launching at the
    instance type's capacity and an initialized node at what its kubelet reports
    (``advertised`` GPU resources): a new node is launched while its instance type's capacity
    fits what the limits leave (scheduler.filterByRemainingResources)."""
    limits = {k: quantity(v) for k, v in node_pool["spec"]["limits"].items()}
    types = next(r["values"] for r in node_pool["spec"]["template"]["spec"]["requirements"]
                 if r["key"] == "node.kubernetes.io/instance-type")
    counts = []
    for name in types:
        launching = {**capacity(name, node_class), "nodes": 1.0}
        running = {**capacity(name, node_class, advertised), "nodes": 1.0}
        used = dict.fromkeys(limits, 0.0)
        count = 0
        while count < 10_000 and all(launching.get(k, 0.0) <= limit - used[k]
                                     for k, limit in limits.items()):
            count += 1
            used = {k: u + running.get(k, 0.0) for k, u in used.items()}
        counts.append(count)
    return min(counts)


def worker_groups(obj: dict) -> list[dict]:
    """Every KubeRay worker group inside a rendered Ray object, at any depth."""
    found: list[dict] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "workerGroupSpecs":
                    found.extend(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj.get("spec", {}))
    return found
