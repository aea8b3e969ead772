"""The add-ons' values name what Terraform creates and what the catalog renders (issue 15):
Velero's bucket (finding 3), Karpenter's cluster, queue and role, the load balancer controller's,
the EFA device plugin's pools, the DaemonSets' requests the capacity math counts, KubeRay's
feature gates, and the Grafana sidecar that loads Ray's dashboards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from raycluster import gitops, monitoring
from raycluster.render import load_inputs, render_objects

REPO = Path(__file__).resolve().parents[3]
HELM = REPO / "infra" / "helm"
TERRAFORM = REPO / "infra" / "terraform"


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


@pytest.fixture(scope="module")
def releases():
    return {r.name: r for r in gitops.load_releases()}


def values(release) -> dict:
    return yaml.safe_load((HELM / release.values).read_text()) if release.values else {}


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def test_velero_writes_to_the_bucket_terraform_creates(releases, env):
    main = (TERRAFORM / "modules" / "platform-services" / "main.tf").read_text()
    rule = re.search(r'velero_bucket_name\s*=\s*coalesce\(var\.velero_bucket_name,\s*"([^"]+)"\)',
                     main)
    assert rule, "platform-services: the Velero bucket's naming rule moved"
    env_main = (TERRAFORM / "environments" / env.name / "main.tf").read_text()
    assert re.search(r"name\s*=\s*var\.cluster_name", env_main)
    bucket = rule[1].replace("${var.name}", env.cluster_name).replace(
        "${local.account_id}", env.account_id)
    location, = values(releases["velero"])["configuration"]["backupStorageLocation"]
    assert location["bucket"] == bucket


def test_karpenter_and_load_balancer_controller_name_terraforms_resources(objects, releases,
                                                                           env):
    karpenter = values(releases["karpenter"])
    assert karpenter["settings"]["clusterName"] == env.cluster_name
    assert karpenter["settings"]["interruptionQueue"] == f"{env.cluster_name}-karpenter"
    # The static MIG NodePool needs the StaticCapacity gate (alpha, off by default).
    static = [o for o in objects if o["kind"] == "NodePool" and "replicas" in o["spec"]]
    assert karpenter["settings"]["featureGates"].get("staticCapacity") is bool(static) is True
    assert karpenter["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"] == \
        f"arn:aws:iam::{env.account_id}:role/{env.cluster_name}-karpenter-controller"
    assert (releases["karpenter"].namespace, karpenter["serviceAccount"]["name"]) == \
        ("karpenter", "karpenter")
    lbc = values(releases["aws-load-balancer-controller"])
    assert (lbc["clusterName"], lbc["region"]) == (env.cluster_name, env.region)
    assert lbc["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"] == \
        f"arn:aws:iam::{env.account_id}:role/{env.cluster_name}-aws-load-balancer-controller"


def test_the_efa_device_plugin_runs_on_the_efa_pools(releases, catalog):
    plugin = values(releases["aws-efa-k8s-device-plugin"])
    efa_pools = sorted(p.name for p in catalog.pools if getattr(p, "efa", False))
    assert efa_pools
    assert plugin["supportedInstanceLabels"] == {"keys": ["rayplane.io/pool"],
                                                 "values": efa_pools}
    tolerated = {(t["key"], t["effect"]) for t in plugin["tolerations"]}
    for pool in catalog.pools:
        if pool.name in efa_pools:
            assert {(t.key, t.effect.value) for t in pool.taints} <= tolerated


#: Where each DaemonSet of raycluster/capacity.py gets its requests: (release, values path).
DAEMONSET_REQUESTS = {
    "linkerd-cni": ("linkerd2-cni", ("resources",)),
    "node-exporter": ("kube-prometheus-stack", ("prometheus-node-exporter", "resources",
                                                "requests")),
    "gpu-operator-node-feature-discovery-worker": (
        "gpu-operator", ("node-feature-discovery", "worker", "resources", "requests")),
    "nvidia-device-plugin-daemonset": ("gpu-operator", ("devicePlugin", "resources", "requests")),
    "gpu-feature-discovery": ("gpu-operator", ("gfd", "resources", "requests")),
    "nvidia-dcgm-exporter": ("gpu-operator", ("dcgmExporter", "resources", "requests")),
    "nvidia-operator-validator": ("gpu-operator", ("validator", "resources", "requests")),
    "nvidia-node-status-exporter": ("gpu-operator", ("nodeStatusExporter", "resources",
                                                     "requests")),
    "nvidia-mig-manager": ("gpu-operator", ("migManager", "resources", "requests")),
    "aws-efa-k8s-device-plugin": ("aws-efa-k8s-device-plugin", ("resources", "requests")),
}


def test_daemonset_requests_are_the_node_budget_capacity_counts(releases):
    """The charts' DaemonSets request what raycluster/capacity.py subtracts from every node."""
    capacity = pytest.importorskip("raycluster.capacity")
    for ds in capacity.DAEMONSETS:
        if ds.name not in DAEMONSET_REQUESTS:  # EKS add-ons: their own requests
            assert ds.installed_by.startswith("EKS add-on"), ds.name
            continue
        release, path = DAEMONSET_REQUESTS[ds.name]
        node = values(releases[release])
        for key in path:
            node = node[key]
        # Linkerd's charts spell it {cpu: {request}, memory: {request}}.
        cpu = node["cpu"]["request"] if isinstance(node["cpu"], dict) else node["cpu"]
        memory = node["memory"]["request"] if isinstance(node["memory"], dict) \
            else node["memory"]
        assert (cpu, memory) == (f"{ds.cpu_m}m", f"{ds.memory_mi}Mi"), ds.name


def test_kuberay_runs_the_features_the_rendered_objects_use(objects, releases, env):
    gates = {g["name"]: g["enabled"] for g in values(releases["kuberay-operator"])["featureGates"]}
    assert gates["RayCronJob"] is True and of_kind(objects, "RayCronJob")
    if getattr(getattr(env, "serving", None), "gateway_class", None):
        assert gates["RayServiceIncrementalUpgrade"] is True
        assert {"gateway-api-crds", "istiod"} <= set(releases)


# -- Ray's dashboards in Grafana -------------------------------------------------------------


def test_rays_dashboards_are_provisioned_to_grafanas_sidecar(objects, releases):
    sidecar = values(releases["kube-prometheus-stack"])["grafana"]["sidecar"]["dashboards"]
    assert sidecar["enabled"] is True and sidecar["searchNamespace"] == "ALL"
    boards = {o["metadata"]["name"] for o in of_kind(objects, "ConfigMap")
              if o["metadata"]["labels"].get(sidecar["label"]) == sidecar["labelValue"]}
    for name in monitoring.RAY_DASHBOARDS:
        assert f"grafana-dashboard-ray-{name.replace('_', '-')}" in boards
