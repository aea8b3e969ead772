"""Namespaces, PriorityClasses, ResourceQuotas and LimitRanges from the catalog, and the
checks that refuse a pod no quota could ever admit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raycluster.catalog import Catalog, Namespace
from raycluster.policy.base import meta
from raycluster.spec import SpecError, did_you_mean

if TYPE_CHECKING:
    from raycluster.environments import Environment


# -- namespaces ----------------------------------------------------------------------------


def render_namespaces(catalog: Catalog, env: Environment) -> list[dict]:
    """The catalog's namespaces, enforcing `restricted` and meshed by Linkerd."""
    out = []
    version = f"v{env.kubernetes_version}"
    for ns in catalog.namespaces:
        labels = {f"pod-security.kubernetes.io/{mode}": "restricted"
                  for mode in ("enforce", "audit", "warn")}
        labels.update({f"pod-security.kubernetes.io/{mode}-version": version
                       for mode in ("enforce", "audit", "warn")})
        labels["rayplane.io/namespace"] = ns.name
        annotations = {
            "linkerd.io/inject": "enabled",
            # Native sidecars let the proxy exit with the main container, so RayJob submitter
            # Jobs complete instead of hanging on a running proxy.
            "config.alpha.linkerd.io/proxy-enable-native-sidecar": "true",
        }
        if ns.purpose:
            annotations["rayplane.io/purpose"] = ns.purpose
        out.append({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": meta(ns.name, labels=labels, annotations=annotations)})
    return out


# -- priority, quota, limits ---------------------------------------------------------------


def render_priority_classes(catalog: Catalog) -> list[dict]:
    return [{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
             "metadata": meta(pc.name), "value": pc.value, "globalDefault": False,
             "description": pc.description or pc.name,
             "preemptionPolicy": "PreemptLowerPriority" if pc.preempting else "Never"}
            for pc in catalog.priority_classes]


def gpu_resource_names(catalog: Catalog) -> list[str]:
    """Extended resources the catalog's GPU pools hand out (nvidia.com/gpu, nvidia.com/mig-...)."""
    return sorted({p.kubernetes_resource for p in catalog.gpu_pools if p.kubernetes_resource})


def render_resource_quotas(catalog: Catalog) -> list[dict]:
    """One ResourceQuota per namespace with a quota, and one that limits its priority classes.

    Kubernetes counts a quota per resource name: ``requests.nvidia.com/gpu: 8`` and
    ``requests.nvidia.com/mig-3g.40gb: 8`` admit 16 units, never 8 in all. So each GPU resource
    of the catalog gets the units the namespace's quota names for it (``quota.gpus``), and 0
    for those it does not name: a namespace uses exactly the kinds of GPU it was given."""
    out = []
    for ns in catalog.namespaces:
        if ns.quota is None:
            continue
        hard = {"requests.cpu": str(ns.quota.cpus), "limits.cpu": str(ns.quota.cpus),
                "requests.memory": ns.quota.memory, "limits.memory": ns.quota.memory}
        for res in gpu_resource_names(catalog):
            hard[f"requests.{res}"] = str(ns.quota.gpu_units(res))
        out.append({"apiVersion": "v1", "kind": "ResourceQuota",
                    "metadata": meta("rayplane-quota", ns.name), "spec": {"hard": hard}})
        out.append(render_priority_class_quota(ns))
    return out


def render_priority_class_quota(ns: Namespace) -> dict:
    """A zero quota on pods of every priority class the namespace may not use.

    Kubernetes has no "classes allowed here" field: the API server's admission configuration
    (``limitedResources``) can demand a covering quota per class, but EKS does not let anyone
    set API server flags. A plain ResourceQuota whose scope selects the other classes with
    ``pods: 0`` does the same: the quota admission refuses such a pod at creation (a Ray pod
    of a RayCluster stays unscheduled with the refusal in the operator's events).
    ``Exists`` together with ``NotIn`` spares pods that name no class (priority 0, which
    preempts nobody) and still catches classes added later, ``system-cluster-critical`` too."""
    allowed = ns.allowed_priority_classes
    exprs: list[dict] = [{"scopeName": "PriorityClass", "operator": "Exists"}]
    if allowed:
        exprs.append({"scopeName": "PriorityClass", "operator": "NotIn", "values": allowed})
    return {"apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": meta("rayplane-priority-classes", ns.name, annotations={
                "rayplane.io/allowed-priority-classes": ",".join(allowed) or "none"}),
            "spec": {"hard": {"pods": "0"}, "scopeSelector": {"matchExpressions": exprs}}}


def render_limit_ranges(catalog: Catalog) -> list[dict]:
    """Defaults for containers that name no resources (quota'd namespaces reject those), and a
    ceiling: no container larger than the largest node or the namespace's quota."""
    biggest_cpu = max(p.instance.vcpus for p in catalog.pools)
    biggest_mem = max(p.instance.memory_gib for p in catalog.pools)
    out = []
    for ns in catalog.namespaces:
        if ns.quota is None:
            continue
        max_cpu_m = 1000 * min(biggest_cpu, ns.quota.cpus)
        max_mem_mi = int(min(biggest_mem, ns.quota.memory_gib) * 1024)
        # The API server refuses defaults above the max: a quota under 1 CPU / 2Gi lowers them.
        out.append({"apiVersion": "v1", "kind": "LimitRange",
                    "metadata": meta("rayplane-limits", ns.name),
                    "spec": {"limits": [{
                        "type": "Container",
                        "default": {"cpu": _cpu(min(1000, max_cpu_m)),
                                    "memory": _memory(min(2048, max_mem_mi))},
                        "defaultRequest": {"cpu": _cpu(min(500, max_cpu_m)),
                                           "memory": _memory(min(1024, max_mem_mi))},
                        "max": {"cpu": _cpu(max_cpu_m), "memory": _memory(max_mem_mi)},
                    }]}})
    return out


def _cpu(millis: int) -> str:
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _memory(mebibytes: int) -> str:
    return f"{mebibytes // 1024}Gi" if mebibytes % 1024 == 0 else f"{mebibytes}Mi"


def check_fits_quota(catalog: Catalog, namespace: str, *, cpus: float, memory_gib: float,
                     gpu_units: int, field: str, what: str = "one worker",
                     resource: str | None = None) -> None:
    """Refuse a pod that the namespace's ResourceQuota could never admit: it would sit
    Pending forever with nothing in the RayCluster's status saying why. ``resource`` is the
    GPU resource name the pod asks for (its pool's ``kubernetes_resource``): quotas count
    each name on their own. Without it, the largest of the namespace's GPU quotas is taken."""
    ns = _namespace(catalog, namespace, field)
    quota = ns.quota
    if quota is None:
        return
    idx = catalog.namespaces.index(ns)
    problems = []
    allowed = quota.gpu_units(resource) if resource else max(quota.gpus.values(), default=0)
    if gpu_units > allowed:
        need = f"{gpu_units} units of {resource}" if resource else f"{gpu_units} GPU units"
        problems.append((f"namespaces[{idx}].quota.gpus", need, allowed))
    if cpus > quota.cpus:
        problems.append((f"namespaces[{idx}].quota.cpus", f"{cpus:g} CPUs", quota.cpus))
    if memory_gib > quota.memory_gib:
        problems.append((f"namespaces[{idx}].quota.memory", f"{memory_gib:g}Gi memory",
                         quota.memory))
    if problems:
        qfield, need, have = problems[0]
        raise SpecError(f"{field}: {what} needs {need} but the quota of namespace "
                        f"{namespace!r} ({qfield}) is {have}; raise the quota or shrink the "
                        "worker", field=field)


def _namespace(catalog: Catalog, name: str, field: str) -> Namespace:
    for ns in catalog.namespaces:
        if ns.name == name:
            return ns
    valid = [n.name for n in catalog.namespaces]
    raise SpecError(f"{field}: {name!r} is not a namespace of the catalog"
                    f"{did_you_mean(name, valid)}; valid: {', '.join(valid)}", field=field)


def check_namespace(catalog: Catalog, name: str, field: str) -> None:
    _namespace(catalog, name, field)


def check_priority_class(catalog: Catalog, name: str, field: str,
                         namespace: str | None = None) -> None:
    """Refuse a priority class the catalog lacks, or (with ``namespace``) one the namespace may
    not use: its ``rayplane-priority-classes`` quota would refuse every pod of it."""
    names = [pc.name for pc in catalog.priority_classes]
    if name not in names:
        raise SpecError(f"{field}: {name!r} is not a priority class{did_you_mean(name, names)};"
                        f" valid: {', '.join(names)}", field=field)
    if namespace is None:
        return
    ns = _namespace(catalog, namespace, field)
    allowed = ns.allowed_priority_classes
    if ns.quota is not None and name not in allowed:
        raise SpecError(f"{field}: {name!r} is not allowed in namespace {namespace!r} (its "
                        f"quota refuses pods of other classes); valid: "
                        f"{', '.join(allowed) or 'none'}", field=field)
