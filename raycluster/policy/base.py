"""What every rendered object and pod shares: rayplane's labels, the ports its policies open,
the `restricted` security contexts, checkov skips with their reasons."""

from __future__ import annotations

import math

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


def cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"
