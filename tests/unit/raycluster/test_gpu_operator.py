"""The GPU Operator's configuration from the catalog: the device plugin's
time-slicing entries and the MIG layouts are what the pools' node labels select, the MIG
layouts are the operator's own, the ClusterPolicy the chart renders from its values (its one
owner) validates against the operator's CRD, and the Helm values agree with the catalog."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from raycluster.catalog import MIG_CONFIG_LABEL, Catalog, SharingMode
from raycluster.gpu_operator import (
    DEVICE_PLUGIN_CONFIG,
    GPU_OPERATOR_VERSION,
    MIG_PARTED_CONFIG,
    render_cluster_policy,
    render_device_plugin_config,
    render_mig_config,
)

REPO = Path(__file__).resolve().parents[3]
HELM = REPO / "infra" / "helm"


def test_time_slice_pools_select_an_entry_with_their_replicas(catalog, env):
    cm = render_device_plugin_config(catalog, env)
    assert cm["metadata"] == {**cm["metadata"], "name": DEVICE_PLUGIN_CONFIG,
                              "namespace": env.gpu_operator_namespace}
    entries = {k: yaml.safe_load(v) for k, v in cm["data"].items()}
    sliced = [p for p in catalog.gpu_pools if p.sharing.mode is SharingMode.time_slicing]
    assert {p.name for p in sliced} == {"a100-timeslice", "h100-timeslice"}
    for pool in sliced:
        entry = entries[pool.node_labels["nvidia.com/device-plugin.config"]]
        ts = entry["sharing"]["timeSlicing"]
        assert ts["resources"] == [{"name": "nvidia.com/gpu", "replicas": 3}]
        # Renamed resources off: a replica is still requested as nvidia.com/gpu.
        assert ts["renameByDefault"] is False
        assert pool.kubernetes_resource == "nvidia.com/gpu"
    # Nodes without the label (the MIG pool) get the default: mixed MIG strategy.
    assert entries["default"]["flags"]["migStrategy"] == "mixed"


def test_a_new_replica_count_gets_its_own_entry(env):
    data = yaml.safe_load((REPO / "raycluster/data/pools.yaml").read_text())
    data["pools"][3]["sharing"]["replicas"] = 2  # h100-timeslice
    catalog = Catalog.parse(data)
    entries = {k: yaml.safe_load(v)
               for k, v in render_device_plugin_config(catalog, env)["data"].items()}
    assert set(entries) == {"default", "time-slicing-2", "time-slicing-3"}
    assert entries["time-slicing-2"]["sharing"]["timeSlicing"]["resources"][0]["replicas"] == 2


def test_mig_pools_select_a_layout_of_the_operators_default_config(catalog, env, schemas_dir):
    cm = render_mig_config(catalog, env)
    assert cm["metadata"]["name"] == MIG_PARTED_CONFIG
    layouts = yaml.safe_load(cm["data"]["config.yaml"])["mig-configs"]
    mig_pool = catalog.pool("a100-mig")
    assert mig_pool.node_labels[MIG_CONFIG_LABEL] == "all-3g.40gb"
    assert set(layouts) == {"all-disabled", "all-3g.40gb"}
    # Copied from the GPU Operator release's own default config, not typed here.
    upstream = yaml.safe_load((schemas_dir / "gpu-operator-v26.7.0" /
                               "default-mig-parted-config.yaml").read_text())
    upstream_layouts = yaml.safe_load(upstream["data"]["config.yaml"])["mig-configs"]
    for name, entries in layouts.items():
        assert entries == upstream_layouts[name]
    # The layout cuts an A100 80GB into as many 3g.40gb instances as the catalog counts.
    per_gpu = layouts["all-3g.40gb"][0]["mig-devices"]["3g.40gb"]
    assert per_gpu * mig_pool.gpus_per_node == mig_pool.gpu_units_per_node


def test_cluster_policy_validates_against_the_operator_crd(catalog, env, schemas_dir):
    crd = yaml.load((schemas_dir / "gpu-operator-v26.7.0" / "nvidia.com_clusterpolicies.yaml")
                    .read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    policy = render_cluster_policy(catalog, env)
    jsonschema.Draft7Validator(schema).validate(policy)
    spec = policy["spec"]
    assert spec["devicePlugin"]["config"]["name"] == DEVICE_PLUGIN_CONFIG
    assert spec["migManager"]["config"]["name"] == MIG_PARTED_CONFIG
    assert spec["mig"]["strategy"] == "mixed"
    assert spec["dcgmExporter"]["enabled"] is True
    # The EKS GPU AMI brings the driver: the operator must not install a second one.
    assert spec["driver"]["enabled"] is False and spec["toolkit"]["enabled"] is False
    tolerated = {(t["key"], t["effect"]) for t in spec["daemonsets"]["tolerations"]}
    for pool in catalog.gpu_pools:
        for taint in pool.taints:
            assert (taint.key, taint.effect.value) in tolerated


def test_helm_values_agree_with_the_cluster_policy(catalog, env):
    values = yaml.safe_load((HELM / "gpu-operator" / "values.yaml").read_text())
    spec = render_cluster_policy(catalog, env)["spec"]
    for key in ("driver", "toolkit", "gfd", "dcgm", "nodeStatusExporter"):
        assert values[key]["enabled"] == spec[key]["enabled"], key
    for key in ("devicePlugin", "migManager"):
        assert {k: values[key]["config"][k] for k in ("name", "default")} == \
            spec[key]["config"], key
        assert values[key]["config"]["create"] is False  # rayplane renders the ConfigMaps
    assert values["mig"] == spec["mig"]
    # The chart's daemonsets reach every GPU pool's nodes (the taints of the catalog).
    assert sorted(values["daemonsets"]["tolerations"], key=str) == \
        sorted(spec["daemonsets"]["tolerations"], key=str)
    assert values["dcgmExporter"]["serviceMonitor"]["enabled"] is True


def test_helm_charts_are_pinned_and_match_the_schemas(env):
    charts = yaml.safe_load((HELM / "charts.yaml").read_text())["releases"]
    names = {r["name"] for r in charts}
    assert {"gpu-operator", "kuberay-operator", "kube-prometheus-stack", "mlflow",
            "linkerd-control-plane", "velero", "external-secrets"} <= names
    for release in charts:
        version = str(release["version"])
        assert version[0].isdigit() or version.startswith("v"), release["name"]
        assert not any(c in version for c in "^~*x><") and version != "latest"
        if "chart" in release:  # a Git folder of manifests (path) has no values file
            assert (HELM / release["values"]).is_file(), release["values"]
    by_name = {r["name"]: r for r in charts}
    assert by_name["gpu-operator"]["version"] == GPU_OPERATOR_VERSION == "v26.7.0"  # shared/schemas
    assert by_name["kuberay-operator"]["version"] == env.kuberay_version  # kuberay-v1.7.0


def test_prometheus_scrapes_ray_and_dcgm():
    values = yaml.safe_load((HELM / "kube-prometheus-stack" / "values.yaml").read_text())
    jobs = {j["job_name"]: j for j in values["prometheus"]["prometheusSpec"]
            ["additionalScrapeConfigs"]}
    ray_ports = next(r["regex"] for r in jobs["ray-nodes"]["relabel_configs"]
                     if r["source_labels"] == ["__meta_kubernetes_pod_container_port_number"])
    assert "8080" in ray_ports
    keep = next(r for r in jobs["ray-nodes"]["relabel_configs"]
                if r["source_labels"] == ["__meta_kubernetes_pod_label_rayplane_io_ray_node"])
    assert keep["action"] == "keep"
    assert "9400" in str(jobs["dcgm-exporter"]["relabel_configs"])
