"""Cluster policy rendered from the catalog: namespaces with the `restricted` Pod Security
Standard, default-deny NetworkPolicies with the allows the platform needs, PriorityClasses,
ResourceQuotas and LimitRanges (GPU quotas in each pool's Kubernetes resource name),
PodDisruptionBudgets, and the security contexts every rendered pod uses.

Pure functions: catalog + environment in, plain dicts out.
"""

from raycluster.policy.base import (
    AUTOSCALER_METRICS_PORT,
    CLUSTER_LABEL,
    DASHBOARD_AGENT_PORT,
    DASHBOARD_METRICS_PORT,
    DASHBOARD_PORT,
    GCS_PORT,
    GRAFANA_PORT,
    LINKERD_ADMIN_PORT,
    MANAGED_LABELS,
    METRICS_PORT,
    MLFLOW_PORT,
    NFS_PORT,
    NODE_TYPE_LABEL,
    POSTGRES_PORT,
    PROMETHEUS_PORT,
    RAY_GID,
    RAY_NAMESPACES,
    RAY_NODE_LABEL,
    RAY_UID,
    ROLE_LABEL,
    SERVE_PORT,
    checkov_skips,
    container_security_context,
    cpu_quantity,
    meta,
    pod_security_context,
)
from raycluster.policy.disruption import render_head_pdb, render_serve_pdb
from raycluster.policy.namespaces import (
    check_fits_quota,
    check_namespace,
    check_priority_class,
    gpu_resource_names,
    render_limit_ranges,
    render_namespaces,
    render_priority_class_quota,
    render_priority_classes,
    render_resource_quotas,
)
from raycluster.policy.network import (
    GATEWAY_PROXY_LABEL,
    gateway_namespaces,
    render_network_policies,
)

__all__ = [
    "AUTOSCALER_METRICS_PORT", "CLUSTER_LABEL", "DASHBOARD_AGENT_PORT", "DASHBOARD_METRICS_PORT",
    "DASHBOARD_PORT", "GATEWAY_PROXY_LABEL", "GCS_PORT", "GRAFANA_PORT", "LINKERD_ADMIN_PORT", "MANAGED_LABELS",
    "METRICS_PORT", "MLFLOW_PORT", "NFS_PORT", "NODE_TYPE_LABEL", "POSTGRES_PORT",
    "PROMETHEUS_PORT", "RAY_GID", "RAY_NAMESPACES", "RAY_NODE_LABEL", "RAY_UID", "ROLE_LABEL",
    "SERVE_PORT", "check_fits_quota", "check_namespace", "check_priority_class",
    "checkov_skips", "container_security_context", "cpu_quantity", "gateway_namespaces", "gpu_resource_names", "meta",
    "pod_security_context", "render_head_pdb", "render_limit_ranges", "render_namespaces",
    "render_network_policies", "render_priority_class_quota", "render_priority_classes",
    "render_resource_quotas", "render_serve_pdb",
]
