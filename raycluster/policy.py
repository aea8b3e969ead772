"""Cluster policy rendered from the catalog: namespaces with the `restricted` Pod Security
Standard, default-deny NetworkPolicies with the allows the platform needs, PriorityClasses,
ResourceQuotas and LimitRanges (GPU quotas in each pool's Kubernetes resource name),
PodDisruptionBudgets, and the security contexts every rendered pod uses.

Pure functions: catalog + environment in, plain dicts out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from raycluster.catalog import Catalog, Namespace
from raycluster.spec import SpecError

if TYPE_CHECKING:
    from raycluster.environments import Environment

#: Labels on every object rayplane renders (what `kubectl get -l` and Argo CD group by).
MANAGED_LABELS = {"app.kubernetes.io/managed-by": "rayplane", "app.kubernetes.io/part-of": "rayplane"}

#: Label rayplane puts on every Ray pod (head and workers): NetworkPolicies select on it rather
#: than on KubeRay's internal labels, which differ between RayCluster, RayJob and RayService.
RAY_NODE_LABEL = "rayplane.io/ray-node"
#: Label of the RayJob submitter pods (they talk to the head's dashboard, nothing else).
ROLE_LABEL = "rayplane.io/role"
CLUSTER_LABEL = "rayplane.io/cluster"
NODE_TYPE_LABEL = "rayplane.io/node-type"

#: The `ray` user and `users` group of the rayproject/ray images that ours build on.
RAY_UID = 1000
RAY_GID = 100

# Ports the allows below open (Ray's defaults as KubeRay starts it).
GCS_PORT = 6379
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365  # the operator reads Serve status through it
SERVE_PORT = 8000
METRICS_PORT = 8080  # rayStartParams metrics-export-port
AUTOSCALER_METRICS_PORT = 44217
DASHBOARD_METRICS_PORT = 44227
MLFLOW_PORT = 5000
LINKERD_ADMIN_PORT = 4191
NFS_PORT = 2049
POSTGRES_PORT = 5432
#: kube-prometheus-stack in namespace monitoring: its Prometheus and Grafana pods (container ports;
#: Grafana's Service answers on 80).
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000

#: Namespaces whose workloads are Ray clusters (the rest run operators or tools).
RAY_NAMESPACES = ("training", "inference", "agentic")


def meta(name: str, namespace: str | None = None, labels: dict | None = None,
         annotations: dict | None = None) -> dict:
    out: dict = {"name": name}
    if namespace:
        out["namespace"] = namespace
    out["labels"] = {**MANAGED_LABELS, **(labels or {})}
    if annotations:
        out["annotations"] = annotations
    return out


# -- pod security --------------------------------------------------------------------------


def pod_security_context() -> dict:
    """Pod-level fields of the `restricted` Pod Security Standard."""
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
            "fsGroup": RAY_GID, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(read_only_root: bool = True) -> dict:
    """Container-level fields of `restricted`. Ray writes only under /tmp (session dirs,
    spilled objects, runtime envs) and ~/.cache, which rayplane mounts as emptyDirs, so the
    root filesystem can be read-only."""
    return {"allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": read_only_root, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


# Static-scan (checkov) findings that do not apply to Ray pods, justified where they are
# skipped: as checkov.io/skipN annotations on the pod templates themselves.
_SKIP_ALL_RAY = {
    "CKV_K8S_8": "KubeRay injects the liveness probe (raylet and GCS health) into Ray containers",
    "CKV_K8S_9": "KubeRay injects the readiness probe (raylet and GCS health) into Ray containers",
    "CKV_K8S_15": "ECR tags are immutable, so IfNotPresent cannot run a stale image and spares "
                  "GPU nodes multi-GB pulls on every start",
    "CKV_K8S_40": "the Ray image's user is uid 1000, owner of its Python environment; restricted "
                  "only requires non-root",
    "CKV_K8S_43": "images are pinned by immutable ECR tag; the digest exists only after CI pushes",
}
_SKIP_HEAD = {"CKV_K8S_38": "the Ray autoscaler sidecar in the head scales worker groups through "
                            "the Kubernetes API with this token"}
_SKIP_SUBMITTER = {
    "CKV_K8S_8": "a run-to-completion submitter Job has nothing to probe",
    "CKV_K8S_9": "a run-to-completion submitter Job has nothing to probe",
    **{k: v for k, v in _SKIP_ALL_RAY.items() if k in ("CKV_K8S_15", "CKV_K8S_40", "CKV_K8S_43")},
}


def checkov_skips(role: str) -> dict[str, str]:
    """``checkov.io/skipN`` annotations for a pod template of ``role`` (head, worker,
    submitter)."""
    if role == "submitter":
        skips = _SKIP_SUBMITTER
    else:
        skips = {**_SKIP_ALL_RAY, **(_SKIP_HEAD if role == "head" else {})}
    return {f"checkov.io/skip{i}": f"{check}={reason}"
            for i, (check, reason) in enumerate(sorted(skips.items()), start=1)}


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
    """One ResourceQuota per namespace with a quota. GPU units are counted in every GPU
    resource name of the catalog, so a namespace cannot exceed its units by mixing time-slice
    replicas and MIG instances; a namespace without GPUs gets 0 of each."""
    out = []
    for ns in catalog.namespaces:
        if ns.quota is None:
            continue
        hard = {"requests.cpu": str(ns.quota.cpus), "limits.cpu": str(ns.quota.cpus),
                "requests.memory": ns.quota.memory, "limits.memory": ns.quota.memory}
        for res in gpu_resource_names(catalog):
            hard[f"requests.{res}"] = str(ns.quota.gpus)
        out.append({"apiVersion": "v1", "kind": "ResourceQuota",
                    "metadata": meta("rayplane-quota", ns.name), "spec": {"hard": hard}})
    return out


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
                     gpu_units: int, field: str, what: str = "one worker") -> None:
    """Refuse a pod that the namespace's ResourceQuota could never admit: it would sit
    Pending forever with nothing in the RayCluster's status saying why."""
    ns = _namespace(catalog, namespace, field)
    quota = ns.quota
    if quota is None:
        return
    idx = catalog.namespaces.index(ns)
    problems = []
    if gpu_units > quota.gpus:
        problems.append((f"namespaces[{idx}].quota.gpus", f"{gpu_units} GPU units", quota.gpus))
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
    from raycluster.spec import did_you_mean

    raise SpecError(f"{field}: {name!r} is not a namespace of the catalog"
                    f"{did_you_mean(name, valid)}; valid: {', '.join(valid)}", field=field)


def check_namespace(catalog: Catalog, name: str, field: str) -> None:
    _namespace(catalog, name, field)


def check_priority_class(catalog: Catalog, name: str, field: str) -> None:
    names = [pc.name for pc in catalog.priority_classes]
    if name not in names:
        from raycluster.spec import did_you_mean

        raise SpecError(f"{field}: {name!r} is not a priority class{did_you_mean(name, names)};"
                        f" valid: {', '.join(names)}", field=field)


# -- disruption budgets --------------------------------------------------------------------


def render_head_pdb(name: str, namespace: str) -> dict:
    """A Ray head is a single point of failure (without GCS FT its jobs and actors die with
    it): voluntary evictions (node drains, consolidation) must wait for an operator."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(f"{name}-head", namespace),
            "spec": {"maxUnavailable": 0,
                     "selector": {"matchLabels": {CLUSTER_LABEL: name, NODE_TYPE_LABEL: "head"}}}}


def render_serve_pdb(name: str, namespace: str) -> dict:
    """Serve replicas drain one worker at a time, so the app keeps answering during drains."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(f"{name}-serve-workers", namespace),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": {CLUSTER_LABEL: name,
                                                  NODE_TYPE_LABEL: "worker"}}}}


# -- network policies ----------------------------------------------------------------------


def _ports(*ports: int, protocol: str = "TCP") -> list[dict]:
    return [{"protocol": protocol, "port": p} for p in ports]


def _ns_selector(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def _netpol(name: str, namespace: str, selector: dict, *, ingress: list | None = None,
            egress: list | None = None) -> dict:
    types = []
    spec: dict = {"podSelector": selector}
    if ingress is not None:
        types.append("Ingress")
        spec["ingress"] = ingress
    if egress is not None:
        types.append("Egress")
        spec["egress"] = egress
    spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(name, namespace), "spec": spec}


def render_network_policies(catalog: Catalog, env: Environment) -> list[dict]:
    """Default deny in every platform namespace, then only what the platform needs."""
    ray_pods = {"matchLabels": {RAY_NODE_LABEL: "true"}}
    submitters = {"matchLabels": {ROLE_LABEL: "ray-submitter"}}
    everything: dict = {}
    vpc = [{"ipBlock": {"cidr": env.vpc_cidr}}]
    names = [ns.name for ns in catalog.namespaces]
    out: list[dict] = []
    for ns in names:
        out.append(_netpol("default-deny", ns, everything, ingress=[], egress=[]))
        out.append(_netpol("allow-dns", ns, everything, egress=[{
            "to": [{**_ns_selector("kube-system"),
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": _ports(53, protocol="UDP") + _ports(53)}]))
        # Linkerd proxies fetch identity, destinations and policy from the control plane;
        # Prometheus scrapes their admin port.
        out.append(_netpol("allow-linkerd", ns, everything,
                           ingress=[{"from": [_ns_selector("monitoring")],
                                     "ports": _ports(LINKERD_ADMIN_PORT)}],
                           egress=[{"to": [_ns_selector("linkerd")],
                                    "ports": _ports(8080, 8086, 8090)}]))
        # AWS APIs over HTTPS (S3 through IRSA, STS, ECR, Secrets Manager) and the Kubernetes
        # API server (the Ray autoscaler scales worker groups through it).
        out.append(_netpol("allow-https-egress", ns, everything,
                           egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                                    "ports": _ports(443)}]))

    for ns in (n for n in names if n in RAY_NAMESPACES):
        # Ray nodes of a namespace talk to each other on many dynamic ports (GCS, raylet,
        # object manager, workers); KubeRay puts every pod of a cluster in one namespace.
        out.append(_netpol("allow-ray-cluster", ns, ray_pods,
                           ingress=[{"from": [{"podSelector": ray_pods}]}],
                           egress=[{"to": [{"podSelector": ray_pods}]}]))
        out.append(_netpol("allow-ray-submitter", ns, submitters,
                           egress=[{"to": [{"podSelector": ray_pods}],
                                    "ports": _ports(DASHBOARD_PORT)}]))
        out.append(_netpol("allow-ray-dashboard-clients", ns, ray_pods, ingress=[
            {"from": [{"podSelector": submitters}], "ports": _ports(DASHBOARD_PORT)},
            # The KubeRay operator polls job status and Serve health.
            {"from": [_ns_selector(env.kuberay_namespace)],
             "ports": _ports(DASHBOARD_PORT, DASHBOARD_AGENT_PORT)},
        ]))
        out.append(_netpol("allow-prometheus-scrape", ns, ray_pods, ingress=[{
            "from": [_ns_selector("monitoring")],
            "ports": _ports(METRICS_PORT, AUTOSCALER_METRICS_PORT, DASHBOARD_METRICS_PORT)}]))
        out.append(_netpol("allow-ray-storage", ns, ray_pods, egress=[
            {"to": vpc, "ports": _ports(NFS_PORT)},  # EFS mount targets
            {"to": vpc, "ports": _ports(GCS_PORT)},  # Redis (ElastiCache) for GCS FT
        ]))
        out.append(_netpol("allow-mlflow-egress", ns, everything, egress=[{
            "to": [{**_ns_selector("mlops"),
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
            "ports": _ports(MLFLOW_PORT)}]))
        # The Ray dashboard embeds Grafana and queries Prometheus (RAY_GRAFANA_HOST,
        # RAY_PROMETHEUS_HOST on the heads): kube-prometheus-stack's pods, by container port.
        out.append(_netpol("allow-monitoring-egress", ns, ray_pods, egress=[{
            "to": [{**_ns_selector("monitoring"), "podSelector": {"matchLabels": {
                "app.kubernetes.io/instance": "kube-prometheus-stack"}}}],
            "ports": _ports(PROMETHEUS_PORT, GRAFANA_PORT)}]))

    if "inference" in names:
        serve_from = [{"ipBlock": {"cidr": c}} for c in env.serve_ingress_cidrs]
        if "agentic" in names:
            serve_from.append(_ns_selector("agentic"))
        out.append(_netpol("allow-serve-ingress", "inference", ray_pods,
                           ingress=[{"from": serve_from, "ports": _ports(SERVE_PORT)}]))
    if "agentic" in names:
        out.append(_netpol("allow-serve-ingress", "agentic", ray_pods, ingress=[{
            "from": [{"ipBlock": {"cidr": c}} for c in env.serve_ingress_cidrs],
            "ports": _ports(SERVE_PORT)}]))
        if "inference" in names:
            # Agent graphs call the served model.
            out.append(_netpol("allow-model-egress", "agentic", ray_pods, egress=[{
                "to": [{**_ns_selector("inference"), "podSelector": ray_pods}],
                "ports": _ports(SERVE_PORT)}]))

    if "mlops" in names:
        mlflow = {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}
        clients = [_ns_selector(n) for n in names if n in RAY_NAMESPACES]
        out.append(_netpol("allow-mlflow", "mlops", mlflow,
                           ingress=[{"from": clients + [_ns_selector("monitoring")],
                                     "ports": _ports(MLFLOW_PORT)}],
                           egress=[{"to": vpc, "ports": _ports(POSTGRES_PORT)}]))

    if "monitoring" in names:
        ray_clients = [_ns_selector(n) for n in names if n in RAY_NAMESPACES]
        out.append(_netpol("allow-monitoring", "monitoring", everything,
                           ingress=[{"from": [{"podSelector": {}}]}]
                           + ([{"from": ray_clients, "ports": _ports(PROMETHEUS_PORT,
                                                                      GRAFANA_PORT)}]
                              if ray_clients else []),
                           egress=[{"to": [{"podSelector": {}}]},
                                   # scrape targets in every namespace (Ray, DCGM, Linkerd)
                                   {"to": [{"namespaceSelector": {}}], "ports": _ports(
                                       METRICS_PORT, AUTOSCALER_METRICS_PORT,
                                       DASHBOARD_METRICS_PORT, LINKERD_ADMIN_PORT, MLFLOW_PORT,
                                       9400)},
                                   # node exporter and kubelet (host network)
                                   {"to": vpc, "ports": _ports(9100, 10250)}]))
    return out


def cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


__all__ = ["MANAGED_LABELS", "RAY_NODE_LABEL", "check_fits_quota", "check_namespace",
           "check_priority_class", "checkov_skips", "container_security_context", "gpu_resource_names", "meta",
           "pod_security_context", "render_head_pdb", "render_limit_ranges",
           "render_namespaces", "render_network_policies", "render_priority_classes",
           "render_resource_quotas", "render_serve_pdb"]
