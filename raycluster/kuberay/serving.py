"""Serving in production: what a RayService needs beyond its pods to run on EKS.

- **GCS fault tolerance over TLS.** The ElastiCache that Terraform creates accepts TLS only, so
  the environment's address is ``rediss://``. Ray's GCS verifies the server certificate with
  hiredis against ``RAY_REDIS_CA_CERT``; every head with GCS FT gets that variable pointing at
  a mounted bundle of the Amazon Trust Services roots (ConfigMap ``rayplane-redis-ca``, from the
  PEM file the environment names), and ``RAY_REDIS_SERVER_NAME`` for SNI. Pinning Amazon's roots
  rather than the image's OS bundle keeps the GCS trust independent of the image's base and
  accepts no other issuer. KubeRay's Redis cleanup Job copies the head template, so it
  verifies the same way.
- **Upgrades.** With a Gateway class (``serving.gateway_class``) a RayService upgrades with
  KubeRay 1.7's ``NewClusterWithIncrementalUpgrade``: KubeRay scales the new cluster up by
  ``maxSurgePercent`` of its Serve capacity at a time (here one worker pod's share), moves
  ``stepSizePercent`` of the traffic every ``intervalSeconds`` through the HTTPRoute
  ``<name>-httproute`` it owns (its weights change during the upgrade, so rayplane never
  renders it: Argo CD would reset them), and scales the old cluster down. Without one:
  ``NewCluster``, blue-green at twice the GPUs, all traffic moved at once.
- **The internal load balancer with TLS** (AWS Load Balancer Controller: an internal Network
  Load Balancer, the ACM certificate on its TLS listener). Incremental upgrades: clients must
  enter through the Gateway, whose one listener KubeRay fixes at plain HTTP on port 80 (it
  rewrites any other listener set); rayplane renders that Gateway exactly as KubeRay builds
  it, so KubeRay adopts it unchanged, and a Service ``<name>-tls`` whose NLB terminates TLS on
  443 in front of the Gateway's proxy pods (the label ``gateway.networking.k8s.io/gateway-name``
  that in-cluster implementations put on them, GEP-1762), with ``<name>-gateway-svc`` for
  in-cluster clients (KubeRay then names Serve Services per cluster). NewCluster: KubeRay's
  own Serve Service (``spec.serveService``), which KubeRay moves to the new cluster at the
  switch, becomes the NLB, TLS on the Serve port (the in-cluster URL keeps its port).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from raycluster.environments import AgentsServiceSpec, Environment, RayServiceSpec
from raycluster.policy import CLUSTER_LABEL, GATEWAY_PROXY_LABEL, meta
from raycluster.spec import SpecError

REPO = Path(__file__).resolve().parents[2]
REDIS_CA_CONFIGMAP = "rayplane-redis-ca"
REDIS_CA_KEY = "ca.crt"
REDIS_CA_DIR = "/etc/rayplane/redis-ca"
INCREMENTAL = "NewClusterWithIncrementalUpgrade"
#: The listener KubeRay 1.7 gives the Gateway it makes (utils.GatewayListenerPortName,
#: utils.DefaultGatewayListenerPort) and compares an existing Gateway with (IsGatewayEqual).
GATEWAY_LISTENER = {"name": "http", "protocol": "HTTP", "port": 80}
#: The label in-cluster Gateway implementations put on a Gateway's proxy pods (GEP-1762);
#: the NetworkPolicies admit those pods by it.
GATEWAY_NAME_LABEL = GATEWAY_PROXY_LABEL
#: Istio, the implementation KubeRay tests incremental upgrades with, reads it from the Gateway:
#: its own Service stays in the cluster; the TLS load balancer is ``<name>-tls``.
ISTIO_SERVICE_TYPE = "networking.istio.io/service-type"
TLS_PORT = 443
NLB_CLASS = "service.k8s.aws/nlb"
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE-----\n")
_LB = "service.beta.kubernetes.io/aws-load-balancer-"


# -- Redis over TLS ------------------------------------------------------------------------


def redis_server_name(env: Environment) -> str:
    return env.redis_address.removeprefix("rediss://").rsplit(":", 1)[0]


def redis_ca_pem(env: Environment, repo_root: Path = REPO) -> str:
    """The CA certificates of the environment's bundle, PEM, comments left out."""
    rel = env.redis_ca_bundle
    path = repo_root / rel if rel else None
    if path is None or not path.is_file():
        raise SpecError(f"redis_ca_bundle: {rel!r}: no such file under {repo_root}",
                        field="redis_ca_bundle")
    certs = _PEM.findall(path.read_text())
    if not certs:
        raise SpecError(f"redis_ca_bundle: {rel!r} holds no PEM certificate",
                        field="redis_ca_bundle")
    return "".join(certs)


def wire_redis_tls(env: Environment, head_template: dict) -> None:
    """The head verifies the Redis certificate: CA bundle mounted, its path in
    RAY_REDIS_CA_CERT, the Redis host name for SNI in RAY_REDIS_SERVER_NAME."""
    if not env.redis_address.startswith("rediss://"):
        return
    spec = head_template["spec"]
    container = spec["containers"][0]
    container["env"].extend([
        {"name": "RAY_REDIS_CA_CERT", "value": f"{REDIS_CA_DIR}/{REDIS_CA_KEY}"},
        {"name": "RAY_REDIS_SERVER_NAME", "value": redis_server_name(env)},
    ])
    spec["volumes"].append({"name": "redis-ca", "configMap": {
        "name": REDIS_CA_CONFIGMAP, "defaultMode": 0o444,
        "items": [{"key": REDIS_CA_KEY, "path": REDIS_CA_KEY}]}})
    container["volumeMounts"].append({"name": "redis-ca", "mountPath": REDIS_CA_DIR,
                                      "readOnly": True})


def render_redis_ca(env: Environment, namespaces: set[str],
                    repo_root: Path = REPO) -> list[dict]:
    """The CA bundle's ConfigMap in every namespace where a head mounts it."""
    if not namespaces:
        return []
    pem = redis_ca_pem(env, repo_root)
    return [{"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": meta(REDIS_CA_CONFIGMAP, ns),
             "data": {REDIS_CA_KEY: pem}} for ns in sorted(namespaces)]


# -- upgrades ------------------------------------------------------------------------------


def max_surge_percent(cluster: dict) -> int:
    """One worker pod's share of the service (KubeRay's advice: resources per pod over the
    cluster's), so that an upgrade adds at most one GPU worker at a time: the GPU groups at
    their maximum, or every group when none has GPUs."""
    groups = cluster["workerGroupSpecs"]
    gpu = [g for g in groups if any(k.startswith("nvidia.com/") for k in g["template"]["spec"][
        "containers"][0]["resources"]["limits"])]
    pods = sum(g["maxReplicas"] for g in (gpu or groups))
    return min(100, max(1, math.ceil(100 / max(1, pods))))


def upgrade_strategy(env: Environment, svc: RayServiceSpec | AgentsServiceSpec, cluster: dict,
                     *, field: str) -> dict:
    serving = env.serving
    gateway_class = serving.gateway_class if serving else None
    kind = svc.upgrade_strategy or (INCREMENTAL if gateway_class else "NewCluster")
    if kind != INCREMENTAL:
        return {"type": kind}
    if serving is None or gateway_class is None:
        raise SpecError(f"{field}.upgrade_strategy: {INCREMENTAL} routes traffic through a "
                        "Gateway, and the environment names no Gateway class "
                        "(serving.gateway_class); use NewCluster or name the class",
                        field=f"{field}.upgrade_strategy")
    surge = max_surge_percent(cluster)
    return {"type": INCREMENTAL, "clusterUpgradeOptions": {
        "gatewayClassName": gateway_class,
        "maxSurgePercent": surge,
        # KubeRay refuses a step larger than the surge.
        "stepSizePercent": min(serving.upgrade_step_size_percent, surge),
        "intervalSeconds": serving.upgrade_interval_seconds}}


# -- the internal load balancer with TLS ---------------------------------------------------


def lb_annotations(env: Environment, *, tls_port: int, health: dict[str, str]) -> dict:
    """An internal NLB (AWS Load Balancer Controller) with a TLS listener holding the ACM
    certificate; targets are pod IPs (no node port hop)."""
    assert env.serving is not None
    return {
        f"{_LB}scheme": "internal",
        f"{_LB}nlb-target-type": "ip",
        f"{_LB}ssl-cert": env.serving.certificate_arn,
        f"{_LB}ssl-ports": str(tls_port),
        f"{_LB}ssl-negotiation-policy": env.serving.ssl_policy,
        f"{_LB}backend-protocol": "tcp",
        **{f"{_LB}healthcheck-{k}": v for k, v in health.items()},
    }


def _sources(env: Environment) -> list[str]:
    assert env.serving is not None
    return env.serving.source_cidrs or env.serve_ingress_cidrs


def serve_service(env: Environment, serve_port: int) -> dict:
    """``spec.serveService`` of a NewCluster RayService: KubeRay's ``<name>-serve-svc`` as an
    internal NLB, TLS on the Serve port (KubeRay keeps only ports named ``serve``), its
    targets the active cluster's Serve pods, health from the Serve proxy."""
    health = {"protocol": "http", "path": "/-/healthz", "port": "traffic-port"}
    return {
        "metadata": {"annotations": lb_annotations(env, tls_port=serve_port, health=health)},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": NLB_CLASS,
                 "loadBalancerSourceRanges": _sources(env),
                 "ports": [{"name": "serve", "port": serve_port, "targetPort": serve_port,
                            "protocol": "TCP"}]},
    }


def gateway_service_name(name: str) -> str:
    """The in-cluster address of an incrementally upgraded RayService: KubeRay then names
    its Serve Services after each cluster (``<cluster>-serve-svc``), so ``<name>-serve-svc``
    no longer exists and in-cluster clients (the agents' model endpoint) call the Gateway."""
    return f"{name}-gateway-svc"


def render_gateway_entry(env: Environment, rayservice: dict, serve_port: int) -> list[dict]:
    """For a RayService upgraded incrementally: its Gateway, as KubeRay builds it (so that
    KubeRay adopts it and never rewrites it), the TLS load balancer in front of the Gateway's
    proxy, and the proxy's in-cluster Service on the Serve port."""
    assert env.serving is not None and env.serving.gateway_class is not None
    name, ns = rayservice["metadata"]["name"], rayservice["metadata"]["namespace"]
    gateway = f"{name}-gateway"  # common.RayServiceGatewayNamespacedName
    labels = {CLUSTER_LABEL: name}
    proxy = {GATEWAY_NAME_LABEL: gateway}
    return [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": meta(gateway, ns, labels=labels,
                          annotations={ISTIO_SERVICE_TYPE: "ClusterIP"}),
         "spec": {"gatewayClassName": env.serving.gateway_class,
                  "listeners": [{**GATEWAY_LISTENER,
                                 "allowedRoutes": {"namespaces": {"from": "Same"}}}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": meta(f"{name}-tls", ns, labels=labels, annotations=lb_annotations(
             env, tls_port=TLS_PORT, health={"protocol": "tcp", "port": "traffic-port"})),
         "spec": {"type": "LoadBalancer", "loadBalancerClass": NLB_CLASS,
                  "loadBalancerSourceRanges": _sources(env),
                  "selector": proxy,
                  "ports": [{"name": "https", "port": TLS_PORT,
                             "targetPort": GATEWAY_LISTENER["port"], "protocol": "TCP"}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": meta(gateway_service_name(name), ns, labels=labels),
         "spec": {"type": "ClusterIP", "selector": proxy,
                  "ports": [{"name": "http", "port": serve_port,
                             "targetPort": GATEWAY_LISTENER["port"], "protocol": "TCP"}]}},
    ]


# -- the whole set -------------------------------------------------------------------------


def _heads(obj: dict) -> list[dict]:
    spec = obj["spec"]
    for cluster in (spec.get("rayClusterConfig"), spec.get("rayClusterSpec"),
                    spec.get("jobTemplate", {}).get("rayClusterSpec"),
                    spec if obj["kind"] == "RayCluster" else None):
        if cluster and "gcsFaultToleranceOptions" in cluster:
            return [cluster["headGroupSpec"]["template"]]
    return []


def render_serving(env: Environment, workloads: list[dict], repo_root: Path = REPO
                   ) -> list[dict]:
    """What the workloads' serving needs besides themselves: the Redis CA bundle where a head
    mounts it, and each incrementally upgraded RayService's Gateway and TLS load balancer."""
    ca_namespaces = {obj["metadata"]["namespace"] for obj in workloads
                     for head in _heads(obj)
                     if any(v.get("configMap", {}).get("name") == REDIS_CA_CONFIGMAP
                            for v in head["spec"]["volumes"])}
    out = render_redis_ca(env, ca_namespaces, repo_root)
    for obj in workloads:
        if obj["kind"] == "RayService" and \
                obj["spec"].get("upgradeStrategy", {}).get("type") == INCREMENTAL:
            port = next(p["containerPort"] for p in obj["spec"]["rayClusterConfig"][
                "headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
                if p["name"] == "serve")
            out.extend(render_gateway_entry(env, obj, port))
    return out


__all__ = ["GATEWAY_LISTENER", "GATEWAY_NAME_LABEL", "INCREMENTAL", "REDIS_CA_CONFIGMAP",
           "REDIS_CA_DIR", "REDIS_CA_KEY", "TLS_PORT", "gateway_service_name",
           "max_surge_percent", "redis_ca_pem",
           "render_gateway_entry", "render_redis_ca", "render_serving", "serve_service",
           "upgrade_strategy", "wire_redis_tls"]
