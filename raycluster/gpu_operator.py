"""The NVIDIA GPU Operator's configuration, rendered from the catalog: the device plugin's
time-slicing ConfigMap and the MIG manager's layouts. The ClusterPolicy that points at them is
the chart's (infra/helm/gpu-operator/values.yaml): the chart always renders ``cluster-policy``, so
rendering it here too gave the object two owners fighting over it (issue 15, finding 3);
:func:`cluster_policy_spec` is what the chart's values must amount to, checked against the CRD.

How a node gets its sharing: the node group (Terraform, from ``Pool.node_labels``) labels a
time-slice node ``nvidia.com/device-plugin.config=time-slicing-3`` and a MIG node
``nvidia.com/mig.config=all-3g.40gb``; the device plugin and the MIG manager read those labels
and pick the entry of the same name from the ConfigMaps below. Renamed resources are off, so a
time-slice replica is still requested as ``nvidia.com/gpu`` and a MIG instance as
``nvidia.com/mig-3g.40gb`` (mixed strategy) -- the names ``Pool.kubernetes_resource`` gives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from raycluster.catalog import Catalog, SharingMode
from raycluster.hardware import mig_parted_layouts
from raycluster.policy import meta

if TYPE_CHECKING:
    from raycluster.environments import Environment

#: Pinned GPU Operator release (the CRD in shared/schemas is this version's).
GPU_OPERATOR_VERSION = "v26.7.0"
DEVICE_PLUGIN_CONFIG = "rayplane-device-plugin-config"
MIG_PARTED_CONFIG = "rayplane-mig-parted-config"
#: Device plugin entry for nodes without the device-plugin.config label (whole GPUs and MIG).
DEFAULT_DEVICE_PLUGIN_ENTRY = "default"
MIG_STRATEGY = "mixed"


def _dump(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def time_slicing_entries(catalog: Catalog) -> dict[str, dict]:
    """Device plugin config entries: one per distinct time-slicing replica count, named as
    the pools' node label value (``Pool.device_plugin_config_name``)."""
    entries: dict[str, dict] = {
        DEFAULT_DEVICE_PLUGIN_ENTRY: {"version": "v1", "flags": {"migStrategy": MIG_STRATEGY}},
    }
    for pool in catalog.gpu_pools:
        if pool.sharing.mode is not SharingMode.time_slicing:
            continue
        entries[pool.device_plugin_config_name] = {
            "version": "v1",
            "flags": {"migStrategy": "none"},
            "sharing": {"timeSlicing": {
                # Keep the name nvidia.com/gpu so KubeRay worker groups request it unchanged.
                "renameByDefault": False,
                # Two replicas of one time-sliced GPU are not two GPUs: refuse such a request
                # rather than let a pod believe it got more compute or memory.
                "failRequestsGreaterThanOne": True,
                "resources": [{"name": "nvidia.com/gpu", "replicas": pool.sharing.replicas}],
            }},
        }
    return entries


def render_device_plugin_config(catalog: Catalog, env: Environment) -> dict:
    entries = time_slicing_entries(catalog)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(DEVICE_PLUGIN_CONFIG, env.gpu_operator_namespace),
            "data": {name: _dump(entries[name]) for name in sorted(entries)}}


def mig_layouts(catalog: Catalog) -> dict[str, list[dict]]:
    """The MIG layouts the catalog's MIG pools select, copied from the GPU Operator's default
    configuration (so each one carries the operator's own per-device entries), plus
    ``all-disabled`` for every other node."""
    defaults = mig_parted_layouts()
    names = {"all-disabled"}
    for pool in catalog.gpu_pools:
        if pool.sharing.mode is SharingMode.mig:
            names.add(pool.node_labels["nvidia.com/mig.config"])
    return {name: defaults[name] for name in sorted(names)}


def render_mig_config(catalog: Catalog, env: Environment) -> dict:
    config = {"version": "v1", "mig-configs": mig_layouts(catalog)}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(MIG_PARTED_CONFIG, env.gpu_operator_namespace),
            "data": {"config.yaml": _dump(config)}}


def gpu_tolerations(catalog: Catalog) -> list[dict]:
    """Tolerations the operator's daemonsets need to reach every GPU pool's nodes."""
    seen: dict[tuple, dict] = {}
    for pool in catalog.gpu_pools:
        for taint in pool.taints:
            tol = {"key": taint.key, "operator": "Exists", "effect": taint.effect.value}
            seen[(taint.key, taint.effect.value)] = tol
    return [seen[k] for k in sorted(seen)]


def cluster_policy_spec(catalog: Catalog, env: Environment) -> dict:
    """The ClusterPolicy spec the platform needs; ``infra/helm/gpu-operator/values.yaml``
    carries the same settings for the chart, which renders the object (a test checks they
    agree)."""
    preinstalled = env.gpu_driver_preinstalled
    return {
        "operator": {"defaultRuntime": "containerd"},
        "daemonsets": {"priorityClassName": "system-node-critical",
                       "tolerations": gpu_tolerations(catalog)},
        # The EKS GPU AMI ships the driver and the container toolkit.
        "driver": {"enabled": not preinstalled},
        "toolkit": {"enabled": not preinstalled},
        "devicePlugin": {"enabled": True,
                         "config": {"name": DEVICE_PLUGIN_CONFIG,
                                    "default": DEFAULT_DEVICE_PLUGIN_ENTRY}},
        "mig": {"strategy": MIG_STRATEGY},
        "migManager": {"enabled": True,
                       "config": {"name": MIG_PARTED_CONFIG, "default": "all-disabled"},
                       # Re-partitioning needs no reboot on A100/H100 with the GPU idle.
                       "env": [{"name": "WITH_REBOOT", "value": "false"}]},
        "gfd": {"enabled": True},
        # The exporter embeds its own DCGM; no separate host engine daemonset.
        "dcgm": {"enabled": False},
        "dcgmExporter": {"enabled": True,
                         "serviceMonitor": {"enabled": True, "interval": "15s",
                                            "honorLabels": False,
                                            "additionalLabels": {
                                                "release": "kube-prometheus-stack"}}},
        "nodeStatusExporter": {"enabled": True},
    }


def render_cluster_policy(catalog: Catalog, env: Environment) -> dict:
    """The ClusterPolicy as the chart names it (``cluster-policy``) with the platform's spec:
    what the tests hold the chart's values to. Not part of the rendered folder."""
    return {"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy",
            "metadata": meta("cluster-policy"), "spec": cluster_policy_spec(catalog, env)}


def render_gpu_operator_namespace(env: Environment) -> dict:
    """The GPU Operator's namespace, rendered so it exists in the platform's sync (the two
    ConfigMaps land there before the operator's chart, a later wave, would create it), at the
    `privileged` Pod Security level its driver, toolkit and device-plugin DaemonSets need (host
    paths, privileged containers). Not meshed."""
    labels = {f"pod-security.kubernetes.io/{mode}": "privileged"
              for mode in ("enforce", "audit", "warn")}
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": meta(env.gpu_operator_namespace, labels=labels,
                             annotations={"linkerd.io/inject": "disabled",
                                          "rayplane.io/pod-security-reason": (
                                              "the GPU Operator's driver, container toolkit and "
                                              "device plugin run privileged with host paths")})}


def render_gpu_operator(catalog: Catalog, env: Environment) -> list[dict]:
    """What rayplane renders for the GPU Operator: its namespace and the two ConfigMaps its
    ClusterPolicy names."""
    return [render_gpu_operator_namespace(env), render_device_plugin_config(catalog, env),
            render_mig_config(catalog, env)]


__all__ = ["DEVICE_PLUGIN_CONFIG", "GPU_OPERATOR_VERSION", "MIG_PARTED_CONFIG",
           "cluster_policy_spec", "mig_layouts", "render_cluster_policy",
           "render_device_plugin_config", "render_gpu_operator", "render_gpu_operator_namespace",
           "render_mig_config",
           "time_slicing_entries"]
