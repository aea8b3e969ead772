"""NetworkPolicies: default deny in every platform namespace, then only what the platform
needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raycluster.catalog import Catalog
from raycluster.policy.base import (
    AUTOSCALER_METRICS_PORT,
    DASHBOARD_AGENT_PORT,
    DASHBOARD_METRICS_PORT,
    DASHBOARD_PORT,
    GCS_PORT,
    GRAFANA_PORT,
    LINKERD_ADMIN_PORT,
    METRICS_PORT,
    MLFLOW_PORT,
    NFS_PORT,
    POSTGRES_PORT,
    PROMETHEUS_PORT,
    RAY_NAMESPACES,
    RAY_NODE_LABEL,
    ROLE_LABEL,
    SERVE_PORT,
    meta,
)

if TYPE_CHECKING:
    from raycluster.environments import Environment


#: The label the Gateway API implementation puts on a Gateway's proxy pods.
GATEWAY_PROXY_LABEL = "gateway.networking.k8s.io/gateway-name"
GATEWAY_PROXY_PODS = {"matchExpressions": [{"key": GATEWAY_PROXY_LABEL, "operator": "Exists"}]}
GATEWAY_HTTP_PORT = 80  # the one listener KubeRay gives the Gateway
ISTIO_READINESS_PORT = 15021  # the proxy's health port, probed by the kubelet
ISTIOD_XDS_PORT = 15012  # where the proxy fetches its config (istiod, namespace istio-system)
INCREMENTAL = "NewClusterWithIncrementalUpgrade"


def gateway_namespaces(env: Environment) -> set[str]:
    """Namespaces with a RayService that upgrades through a Gateway (its proxy pods live there):
    the strategy a service names, else incremental when the environment has a Gateway class."""
    gateway_class = env.serving.gateway_class if env.serving else None
    out = set()
    for svc in [*env.services, *env.agents]:
        strategy = getattr(svc, "upgrade_strategy", None) or (
            INCREMENTAL if gateway_class else "NewCluster")
        if strategy == INCREMENTAL:
            out.add(svc.namespace)
    return out


def _gateway_peer(gateways: set[str], namespace: str) -> list[dict]:
    return [{"podSelector": GATEWAY_PROXY_PODS}] if namespace in gateways else []


def _gateway_policy(namespace: str, env: Environment, *, agentic_clients: bool) -> dict:
    """The Gateway's proxy pods: HTTP from the internal load balancer (ip targets, so the
    NLB's own addresses in the serve CIDRs) and, in inference, from the agent graphs; the
    kubelet's readiness probe; out to the Serve pods of its namespace and to istiod."""
    clients = [{"ipBlock": {"cidr": c}} for c in env.serve_ingress_cidrs]
    if agentic_clients:
        clients.append(_ns_selector("agentic"))
    return _netpol("allow-gateway", namespace, GATEWAY_PROXY_PODS, ingress=[
        {"from": clients, "ports": _ports(GATEWAY_HTTP_PORT)},
        {"from": [{"ipBlock": {"cidr": env.vpc_cidr}}], "ports": _ports(ISTIO_READINESS_PORT)},
    ], egress=[
        {"to": [{"podSelector": {"matchLabels": {RAY_NODE_LABEL: "true"}}}],
         "ports": _ports(SERVE_PORT)},
        {"to": [_ns_selector("istio-system")], "ports": _ports(ISTIOD_XDS_PORT)},
    ])


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
    gateways = gateway_namespaces(env)
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
                           ingress=[{"from": serve_from + _gateway_peer(gateways, "inference"),
                                     "ports": _ports(SERVE_PORT)}]))
    if "agentic" in names:
        out.append(_netpol("allow-serve-ingress", "agentic", ray_pods, ingress=[{
            "from": [{"ipBlock": {"cidr": c}} for c in env.serve_ingress_cidrs]
            + _gateway_peer(gateways, "agentic"),
            "ports": _ports(SERVE_PORT)}]))
        if "inference" in names:
            # Agent graphs call the served model: its Serve pods, or its Gateway's proxy when
            # the RayService upgrades incrementally (openai-gateway-svc).
            egress = [{"to": [{**_ns_selector("inference"), "podSelector": ray_pods}],
                       "ports": _ports(SERVE_PORT)}]
            if "inference" in gateways:
                egress.append({"to": [{**_ns_selector("inference"),
                                       "podSelector": GATEWAY_PROXY_PODS}],
                               "ports": _ports(GATEWAY_HTTP_PORT)})
            out.append(_netpol("allow-model-egress", "agentic", ray_pods, egress=egress))
    for ns in sorted(gateways & set(names)):
        out.append(_gateway_policy(ns, env, agentic_clients=ns == "inference"
                                   and "agentic" in names))

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
