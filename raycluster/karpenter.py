"""Karpenter, rendered from the catalog: the nodes of every GPU pool appear when a Ray worker
of that pool is pending and go when they are empty. The cpu pool stays an EKS managed node
group (Terraform): it carries the Ray heads, the operators and Karpenter itself.

Per GPU pool, two objects named after the pool:

- an ``EC2NodeClass`` (karpenter.k8s.aws/v1): the EKS-optimized accelerated AL2023 AMI (NVIDIA
  driver, container toolkit and EFA driver on board, so the GPU Operator leaves them alone),
  the node IAM role, the subnets and security groups Terraform tags for discovery, the root
  volume, IMDSv2, and for ``efa: true`` pools one EFA interface per network card in the pool's
  cluster placement group;
- a ``NodePool`` (karpenter.sh/v1): the pool's instance types and capacity type, the node
  labels the Ray worker pods select on (``rayplane.io/pool``) and the GPU Operator reads
  (``nvidia.com/mig.config``, ``nvidia.com/device-plugin.config``), the pool's taints, limits
  of ``max_nodes`` nodes, and disruption: consolidate only empty nodes, one node at a time,
  expire after 30 days.

Karpenter decides from the instance type alone: a p4d, p4de or p5 is ``nvidia.com/gpu: 8`` to
it, whatever the GPU Operator makes of the node later (NodeOverlay, which could tell it
otherwise, is alpha and has no CRD in the schemas rayplane validates against). So:

- a time-slice pool stays dynamic: a worker asking ``nvidia.com/gpu: 1`` fits Karpenter's 8,
  and a node comes from zero. A burst of workers is packed 8 to a node where the device plugin
  will offer 24, so it may buy up to 3x the nodes; the empty ones go after
  ``CONSOLIDATE_AFTER``.
- a MIG pool is static (``spec.replicas``, Karpenter's StaticCapacity, alpha: the chart's
  ``settings.featureGates.staticCapacity``): no instance type offers
  ``nvidia.com/mig-3g.40gb``, so Karpenter would never launch a node for a pending MIG worker.
  It keeps the pool's ``desired_nodes`` (default ``min_nodes``) standing instead, and the MIG
  manager cuts their GPUs before any worker lands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raycluster.capacity import KARPENTER_MAX_PODS, standing_nodes
from raycluster.catalog import CapacityType, Catalog, Pool
from raycluster.hardware import hardware
from raycluster.policy import meta
from raycluster.spec import SpecError

if TYPE_CHECKING:
    from raycluster.environments import Environment

#: Pinned Karpenter release (the CRDs in shared/schemas are this version's).
KARPENTER_VERSION = "1.14.1"
NODEPOOL_API = "karpenter.sh/v1"
NODECLASS_API = "karpenter.k8s.aws/v1"
NODECLASS_GROUP = "karpenter.k8s.aws"
#: The EKS-optimized AL2023 AMI release, pinned: Karpenter picks the accelerated (NVIDIA)
#: variant of this release for GPU instance types. ``@latest`` would replace every GPU node
#: (drift) whenever AWS publishes an AMI; a new pin does the same, but when rayplane says so.
#: v20260714 ships amazon-eks-node-al2023-x86_64-nvidia-1.33-v20260714 (Kubernetes 1.33).
AMI_ALIAS = "al2023@v20260714"
#: Tag Terraform puts on the private subnets and the node security groups (value: cluster name).
DISCOVERY_TAG = "karpenter.sh/discovery"
#: Pods per GPU node (kubelet maxPods). The VPC CNI's ENI limit (737 on a p4d) would make the
#: kubelet reserve memory for pods that never come: a GPU node runs a few Ray workers and the
#: DaemonSets. raycluster.capacity budgets the nodes with the same number.
MAX_PODS = KARPENTER_MAX_PODS
#: AL2023's root device.
ROOT_DEVICE = "/dev/xvda"
#: An empty GPU node waits this long before it goes: Ray's autoscaler removes idle workers
#: after their group's idleTimeoutSeconds, and the next job of the day reuses a node (and its
#: pulled multi-GB image) instead of waiting minutes for a new one.
CONSOLIDATE_AFTER = "10m"
#: Every GPU node is drained after 30 days (AMI and kernel patches reach the fleet). Expiry is
#: forceful: no disruption budget holds it back...
EXPIRE_AFTER = "720h"
#: ...but a draining node (expired or drifted) waits at most this long for PodDisruptionBudgets
#: and `karpenter.sh/do-not-disrupt` pods (a Serve replica moving, a training step finishing)
#: before Karpenter deletes the remaining pods: no node outlives 720h + 4h, and a patched AMI
#: cannot be held off by one stuck pod.
TERMINATION_GRACE_PERIOD = "4h"
#: Karpenter voluntarily disrupts (drift, emptiness) at most one GPU node of a pool at a time:
#: a training cluster loses one node's workers, a RayService one node's replicas.
DISRUPTION_BUDGETS = [{"nodes": "1"}]
CAPACITY_TYPE_LABEL = "karpenter.sh/capacity-type"
NODEPOOL_LABEL = "karpenter.sh/nodepool"
_CAPACITY_TYPES = {CapacityType.spot: "spot", CapacityType.on_demand: "on-demand"}


def node_role(env: Environment) -> str:
    """The IAM role of Karpenter's nodes: Terraform's module karpenter creates it, its
    instance profile and its EKS access entry as ``<cluster_name>-karpenter-node``
    (rayplane-production-karpenter-node)."""
    return f"{env.cluster_name}-karpenter-node"


def placement_group(env: Environment, pool: Pool) -> str:
    """The cluster placement group Terraform creates for an ``efa: true`` pool."""
    return f"{env.cluster_name}-{pool.name}"


def karpenter_pools(catalog: Catalog) -> list[Pool]:
    """Pools whose nodes Karpenter launches: every GPU pool."""
    return catalog.gpu_pools


def efa_interfaces(pool: Pool) -> int:
    """EFA interfaces each node of the pool gets: one per network card, as many as every
    instance type of the pool takes (0 for pools without ``efa``)."""
    if not pool.efa:
        return 0
    types = hardware().instance_types
    return min(types[name].efa_interfaces for name in pool.instance_types)


def network_interfaces(pool: Pool) -> list[dict]:
    """The primary (IP) interface on network card 0, then one ``efa-only`` interface per
    network card (card 0's as its second device). efa-only interfaces take no IP address from
    the subnet; NCCL reaches the other nodes through them (aws-ofi-nccl), and Karpenter offers
    their count as ``vpc.amazonaws.com/efa`` to pods that ask for it."""
    count = efa_interfaces(pool)
    if not count:
        return []
    out = [{"networkCardIndex": 0, "deviceIndex": 0, "interfaceType": "interface"}]
    out += [{"networkCardIndex": card, "deviceIndex": 1 if card == 0 else 0,
             "interfaceType": "efa-only"} for card in range(count)]
    return out


def _tags(env: Environment, pool: Pool) -> dict[str, str]:
    # What Terraform tags its own resources with, plus the pool: cost allocation per pool.
    return {"rayplane.io/cluster": env.cluster_name, "rayplane.io/environment": env.name,
            "rayplane.io/pool": pool.name}


def render_node_class(env: Environment, pool: Pool) -> dict:
    def discovery() -> list[dict]:
        return [{"tags": {DISCOVERY_TAG: env.cluster_name}}]

    spec: dict = {
        "amiSelectorTerms": [{"alias": AMI_ALIAS}],
        "role": node_role(env),
        "subnetSelectorTerms": discovery(),
        # The cluster's node security group (and the EFA group, which lets EFA traffic in
        # from itself) carry the same discovery tag.
        "securityGroupSelectorTerms": discovery(),
        # Private subnets only; images come through the VPC endpoints and the NAT gateway.
        "associatePublicIPAddress": False,
        "blockDeviceMappings": [{
            "deviceName": ROOT_DEVICE,
            "rootVolume": True,
            "ebs": {"volumeSize": f"{pool.disk_size_gib}Gi", "volumeType": "gp3",
                    # CUDA and vLLM images are many GB; gp3's baseline unpacks them slowly.
                    "iops": 6000, "throughput": 500,
                    "encrypted": True, "deleteOnTermination": True},
        }],
        # IMDSv2 only, and one hop: pods get AWS credentials from IRSA (their ServiceAccount),
        # never the node role's; host-network DaemonSets (VPC CNI, EFA plugin) still reach it.
        "metadataOptions": {"httpEndpoint": "enabled", "httpProtocolIPv6": "disabled",
                            "httpPutResponseHopLimit": 1, "httpTokens": "required"},
        "kubelet": {"maxPods": MAX_PODS},
        "tags": _tags(env, pool),
    }
    interfaces = network_interfaces(pool)
    if interfaces:
        spec["networkInterfaces"] = interfaces
        # EFA's latency needs the nodes close together: one cluster placement group per pool
        # (Terraform creates it; Karpenter launches into it and keeps to its zone).
        spec["placementGroupSelector"] = {"name": placement_group(env, pool)}
    return {"apiVersion": NODECLASS_API, "kind": "EC2NodeClass",
            "metadata": meta(pool.name, labels={"rayplane.io/pool": pool.name}),
            "spec": spec}


def node_capacity(pool: Pool) -> dict[str, int]:
    """What one node of the pool advertises once the GPU Operator has configured it: the
    pool's GPU resource (MIG instances, time-slice replicas or whole GPUs) per node."""
    resource = pool.kubernetes_resource
    return {resource: pool.gpu_units_per_node} if resource else {}


def is_static(pool: Pool) -> bool:
    """A MIG pool's NodePool keeps standing nodes (``spec.replicas``): Karpenter launches only
    for resources an instance type offers, and ``nvidia.com/mig-*`` exists only once the MIG
    manager has cut the node's GPUs, so a pending MIG worker would never get a node."""
    return standing_nodes(pool) is not None


def static_replicas(pool: Pool) -> int:
    """The nodes a static pool keeps: the catalog's ``desired_nodes`` (nodes at creation),
    default ``min_nodes``."""
    return standing_nodes(pool) or 0


def limits(pool: Pool) -> dict[str, str | int]:
    """``max_nodes`` nodes of the pool. A static pool may say only ``nodes`` (the CRD's rule):
    its bound on the surge a drift or expiry replacement takes above ``replicas``.

    A dynamic pool says the same bound in every resource Karpenter counts, and ``nodes`` is
    the one that binds. Karpenter counts a node twice over its life: a NodeClaim still
    launching counts the instance type's ``nvidia.com/gpu: 8``, an initialized node what its
    kubelet advertises, 24 on a time-sliced p4d or p5 (state.StateNode.Capacity in Karpenter
    v1.14.1). The GPU limit is therefore ``max_nodes`` x the advertised units: 8 x
    ``max_nodes`` would stop the pool at a third of its nodes once the first ones came up."""
    if is_static(pool):
        return {"nodes": str(pool.max_nodes)}
    node = pool.instance
    out: dict[str, str | int] = {"nodes": str(pool.max_nodes),
                                 "cpu": str(pool.max_nodes * node.vcpus),
                                 "memory": f"{pool.max_nodes * node.memory_gib}Gi"}
    for resource, per_node in node_capacity(pool).items():
        out[resource] = str(pool.max_nodes * max(per_node, node.gpus))
    return out


def requirements(pool: Pool) -> list[dict]:
    return [
        {"key": "node.kubernetes.io/instance-type", "operator": "In",
         "values": list(pool.instance_types)},
        {"key": CAPACITY_TYPE_LABEL, "operator": "In",
         "values": [_CAPACITY_TYPES[pool.capacity_type]]},
        # The GPU image is built for x86_64 (every GPU instance type of the hardware table is).
        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
    ]


def render_node_pool(pool: Pool) -> dict:
    template_spec: dict = {
        "nodeClassRef": {"group": NODECLASS_GROUP, "kind": "EC2NodeClass", "name": pool.name},
        "requirements": requirements(pool),
        "expireAfter": EXPIRE_AFTER,
        "terminationGracePeriod": TERMINATION_GRACE_PERIOD,
    }
    if pool.taints:
        template_spec["taints"] = [{"key": t.key, "value": t.value, "effect": t.effect.value}
                                   if t.value else {"key": t.key, "effect": t.effect.value}
                                   for t in pool.taints]
    spec: dict = {
        # The labels pods select on and the GPU Operator reads; Karpenter puts them on the
        # node at launch, so the MIG manager and device plugin configure it before any Ray
        # worker lands.
        "template": {"metadata": {"labels": dict(pool.node_labels)}, "spec": template_spec},
        # WhenEmpty: a busy GPU node is never emptied to repack its Ray workers elsewhere (a
        # training step or a Serve replica would restart); Ray's autoscaler empties it.
        "disruption": {"consolidationPolicy": "WhenEmpty",
                       "consolidateAfter": CONSOLIDATE_AFTER,
                       "budgets": [dict(b) for b in DISRUPTION_BUDGETS]},
        "limits": limits(pool),
    }
    if is_static(pool):
        # Static capacity: Karpenter keeps this many nodes whatever is pending and never
        # consolidates them (it ignores the policy; "Never" says so). Drift and expiry still
        # replace them, one at a time. The catalog owns the count: `kubectl scale nodepool`
        # is undone by Argo CD's self-heal; change desired_nodes and re-render instead.
        spec["replicas"] = static_replicas(pool)
        spec["disruption"]["consolidateAfter"] = "Never"
    return {"apiVersion": NODEPOOL_API, "kind": "NodePool",
            "metadata": meta(pool.name, labels={"rayplane.io/pool": pool.name}),
            "spec": spec}


def render_karpenter(catalog: Catalog, env: Environment) -> list[dict]:
    """EC2NodeClass and NodePool of every GPU pool (a MIG pool's NodePool static)."""
    out: list[dict] = []
    for pool in karpenter_pools(catalog):
        if is_static(pool) and static_replicas(pool) == 0:
            # Nothing else would ever start a node for this pool's workers.
            field = "min_nodes" if pool.desired_nodes is None else "desired_nodes"
            raise SpecError(
                f"pools[{catalog.pools.index(pool)}].{field}: 0 standing nodes for MIG pool "
                f"{pool.name!r}: Karpenter never launches a node for "
                f"{pool.kubernetes_resource}, so its workers would stay Pending; set it to 1 "
                "or more", field=f"pools[{catalog.pools.index(pool)}].{field}")
        out.append(render_node_class(env, pool))
        out.append(render_node_pool(pool))
    return out


__all__ = ["AMI_ALIAS", "DISCOVERY_TAG", "KARPENTER_VERSION", "MAX_PODS", "efa_interfaces",
           "is_static", "karpenter_pools", "limits", "network_interfaces", "node_capacity",
           "node_role", "placement_group", "render_karpenter", "render_node_class",
           "render_node_pool", "requirements", "static_replicas"]
