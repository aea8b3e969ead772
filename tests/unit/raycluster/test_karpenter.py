"""Karpenter for the GPU pools (issue 15, finding 1: nothing added GPU nodes). The rendered
EC2NodeClasses and NodePools validate against Karpenter v1.14.1's CRDs (and the CEL rules the
API server would run), and the scale-from-zero path holds on paper: every Ray worker pod of a
GPU pool that the production environment renders, pending on an empty cluster, gets a node
from exactly one NodePool -- followed the way Karpenter's scheduling simulation follows it
(labels and requirements, taints, and the pod's requests against an instance type's
allocatable as Karpenter computes it from the instance type alone). A time-slice pool's
NodePool launches that node; the MIG pool's is static, and the pod fits its standing nodes
once the GPU Operator has cut their GPUs."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from raycluster import gpu_operator, karpenter
from raycluster.catalog import Catalog
from raycluster.hardware import hardware
from raycluster.render import load_inputs, render_objects
from raycluster.spec import SpecError
from tests.support.crds import strict
from tests.support.karpenter import (
    RAY_KINDS,
    advertised_gpus,
    cel_errors,
    gpu_worker_pods,
    nodes_admitted,
    of_kind,
    placements,
    ray_pods,
    why_not_launched,
    worker_groups,
    workers_per_node,
)

REPO = Path(__file__).resolve().parents[3]
KARPENTER_SCHEMAS = "karpenter-v1.14.1"
CRDS = {"NodePool": ("karpenter.sh_nodepools.yaml", "v1"),
        "EC2NodeClass": ("karpenter.k8s.aws_ec2nodeclasses.yaml", "v1")}


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


@pytest.fixture(scope="module")
def validators(schemas_dir):
    out = {}
    for kind, (name, version) in CRDS.items():
        path = schemas_dir / KARPENTER_SCHEMAS / name
        if not path.is_file():
            continue
        crd = yaml.safe_load(path.read_text())
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        out[kind] = jsonschema.Draft7Validator(strict(schema["schema"]["openAPIV3Schema"]))
    return out


# -- the scale-from-zero path --------------------------------------------------------------


def by_name(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in of_kind(objects, kind)}


def test_every_gpu_worker_pod_gets_a_node_from_exactly_one_nodepool(objects, catalog):
    # Fails on the output before Karpenter (commit 3568e9c): render_objects made no NodePool,
    # so every GPU worker below matched none -- a RayJob, a RayCronJob or a training cluster
    # scaling from zero stayed Pending for good.
    pods = gpu_worker_pods(objects, catalog)
    kinds = {where.split("/")[0] for where, _, _ in pods}
    assert kinds == RAY_KINDS, f"the production render has GPU workers in {kinds} only"
    assert {pool for _, pool, _ in pods} == {p.name for p in catalog.gpu_pools}
    for where, pool, template in pods:
        verdicts = placements(template["spec"], objects)
        able = [name for name, why in verdicts.items() if why is None]
        assert able == [pool], f"{where} (pool {pool}): NodePools giving it a node: " \
                               f"{able or 'none'}; why not: {verdicts}"


def test_time_slice_workers_make_karpenter_launch_a_node_from_zero(objects, catalog):
    # Karpenter sees a p4d/p5 as nvidia.com/gpu: 8 (it cannot know the 3x time-slicing); a
    # worker asking 1 fits that, so the dynamic NodePool launches a node for it.
    pools, classes = by_name(objects, "NodePool"), by_name(objects, "EC2NodeClass")
    seen = set()
    for where, pool, template in gpu_worker_pods(objects, catalog):
        if catalog.pool(pool).sharing.mode.value != "time-slicing":
            continue
        seen.add(pool)
        assert "replicas" not in pools[pool]["spec"], f"{pool} must scale from zero"
        assert why_not_launched(template["spec"], pools[pool], classes[pool]) is None, where
    assert seen == {"a100-timeslice", "h100-timeslice"}


def test_karpenter_cannot_launch_for_a_mig_worker_so_the_mig_pool_keeps_standing_nodes(
        objects, catalog):
    # Karpenter knows a p4de as 8 nvidia.com/gpu and nothing of nvidia.com/mig-3g.40gb: a
    # dynamic MIG NodePool would leave every MIG worker Pending. Hence spec.replicas.
    pools, classes = by_name(objects, "NodePool"), by_name(objects, "EC2NodeClass")
    mig = catalog.pool("a100-mig")
    node_pool = pools[mig.name]
    where, _, template = next(p for p in gpu_worker_pods(objects, catalog) if p[1] == mig.name)
    dynamic = {**node_pool, "spec": {k: v for k, v in node_pool["spec"].items()
                                     if k != "replicas"}}
    why = why_not_launched(template["spec"], dynamic, classes[mig.name])
    assert why == "p4de.24xlarge lacks nvidia.com/mig-3g.40gb", where
    assert node_pool["spec"]["replicas"] >= 1
    assert node_pool["spec"]["replicas"] == karpenter.static_replicas(mig) == mig.min_nodes
    assert node_pool["spec"]["limits"] == {"nodes": str(mig.max_nodes)}
    # Once the MIG manager applied all-3g.40gb: 8 GPUs x 2 instances, no whole GPU left.
    assert advertised_gpus(node_pool, objects) == {"nvidia.com/gpu": 0.0,
                                                   "nvidia.com/mig-3g.40gb": 16.0}
    static = [name for name, p in pools.items() if "replicas" in p["spec"]]
    assert static == [p.name for p in catalog.gpu_pools if p.sharing.mode.value == "mig"]


def test_the_standing_mig_nodes_hold_every_mig_worker_at_max_replicas(objects, catalog):
    # A static pool does not grow with demand: its replicas must hold every MIG worker group
    # at maxReplicas, a RayService's twice (an upgrade runs the new cluster beside the old).
    pools, classes = by_name(objects, "NodePool"), by_name(objects, "EC2NodeClass")
    for name, node_pool in pools.items():
        if "replicas" not in node_pool["spec"]:
            continue
        advertised = advertised_gpus(node_pool, objects)
        want, room = 0, []
        for obj in objects:
            for group in worker_groups(obj) if obj["kind"] in RAY_KINDS else []:
                template = group["template"]
                if template["metadata"].get("labels", {}).get("rayplane.io/pool") != name:
                    continue
                want += group["maxReplicas"] * (2 if obj["kind"] == "RayService" else 1)
                room.append(min(workers_per_node(template["spec"], t, classes[name], advertised)
                                for t in catalog.pool(name).instance_types))
        assert want, f"no workload uses static pool {name}"
        assert want <= node_pool["spec"]["replicas"] * min(room), \
            f"{name}: {want} workers at max, {node_pool['spec']['replicas']} node(s) of {room}"


def test_a_mig_pool_holds_only_what_its_standing_nodes_hold(catalog, env):
    # max_nodes bounds only a replacement's surge on a static pool: sizing a worker group or
    # a training run by it would promise pods that never get a node.
    from raycluster.environments import WorkerGroupSpec
    from raycluster.kuberay.sizing import resolve_group

    pool = catalog.pool("a100-mig")
    standing = karpenter.static_replicas(pool)
    assert 1 <= standing < pool.max_nodes
    assert pool.max_workers == pool.workers_per_node * standing
    group = resolve_group(catalog, WorkerGroupSpec(pool="a100-mig"), "clusters[0].worker_groups[0]")
    assert group.max_replicas == pool.workers_per_node * standing


def test_a_mig_pool_without_standing_nodes_is_refused_naming_the_field(catalog, env):
    data = catalog.model_dump(mode="json")
    index = next(i for i, p in enumerate(data["pools"]) if p["name"] == "a100-mig")
    data["pools"][index]["min_nodes"] = 0
    with pytest.raises(SpecError, match=rf"pools\[{index}\]\.min_nodes: 0 standing nodes"):
        karpenter.render_karpenter(Catalog.parse(data), env)


def test_a_time_slice_burst_buys_at_most_three_times_the_nodes_it_needs(objects, catalog):
    # The cost of Karpenter's 8-GPU view: a burst of workers is packed 8 to a node where the
    # device plugin will offer 24. WhenEmpty consolidation removes the spare nodes.
    pools, classes = by_name(objects, "NodePool"), by_name(objects, "EC2NodeClass")
    for obj in of_kind(objects, "RayCluster"):
        for group in worker_groups(obj):
            name = group["template"]["metadata"]["labels"]["rayplane.io/pool"]
            if catalog.pool(name).sharing.mode.value != "time-slicing":
                continue
            spec, burst = group["template"]["spec"], group["maxReplicas"]
            node_type = catalog.pool(name).instance_types[0]
            seen = workers_per_node(spec, node_type, classes[name])
            real = workers_per_node(spec, node_type, classes[name],
                                    advertised_gpus(pools[name], objects))
            assert (seen, real) == (8, 24), name
            bought, needed = -(-burst // seen), -(-burst // real)
            assert needed <= bought <= 3 * needed
            assert pools[name]["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"


def test_heads_submitters_and_cpu_workers_never_get_a_gpu_node(objects, catalog):
    # The cpu pool is a managed node group; a pod that fits there must not make Karpenter buy
    # a p4d (what an untainted GPU NodePool would do for a pending head or submitter), nor
    # land on the standing MIG nodes.
    others = [(where, t) for where, t in ray_pods(objects)
              if not catalog.pool(t["metadata"].get("labels", {})
                                  .get("rayplane.io/pool", "cpu")).has_gpu]
    assert any("headGroupSpec" in w for w, _ in others)
    assert any("submitterPodTemplate" in w for w, _ in others)
    for where, template in others:
        verdicts = placements(template["spec"], objects)
        assert not [n for n, why in verdicts.items() if why is None], where


# -- the objects ---------------------------------------------------------------------------


def test_a_nodepool_and_ec2nodeclass_per_gpu_pool_and_none_for_the_cpu_pool(objects, catalog):
    gpu = {p.name for p in catalog.gpu_pools}
    assert {o["metadata"]["name"] for o in of_kind(objects, "NodePool")} == gpu
    assert {o["metadata"]["name"] for o in of_kind(objects, "EC2NodeClass")} == gpu
    assert catalog.head_pool.name not in gpu
    for pool in of_kind(objects, "NodePool"):
        ref = pool["spec"]["template"]["spec"]["nodeClassRef"]
        assert ref == {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass",
                       "name": pool["metadata"]["name"]}


def test_karpenter_objects_validate_against_the_v1_14_1_crds(objects, validators):
    assert set(validators) == set(CRDS)
    # Every object of Karpenter's API groups, so an alpha kind without a CRD in the schemas
    # (NodeOverlay, karpenter.sh/v1alpha1) cannot slip in unvalidated.
    rendered = [o for o in objects if o["apiVersion"].split("/")[0].startswith("karpenter.")]
    assert {o["kind"] for o in rendered} == {"NodePool", "EC2NodeClass"}
    for obj in rendered:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["apiVersion"] == {"NodePool": "karpenter.sh/v1",
                                     "EC2NodeClass": "karpenter.k8s.aws/v1"}.get(obj["kind"])
        assert obj["kind"] in validators, \
            f"{name}: no CRD for it in shared/schemas/{KARPENTER_SCHEMAS}"
        errors = sorted(validators[obj["kind"]].iter_errors(obj), key=lambda e: e.path)
        assert not errors, f"{name}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        assert not cel_errors(obj), f"{name}: {cel_errors(obj)}"


def test_the_schema_check_catches_a_misspelled_field(objects, validators):
    pool = yaml.safe_load(yaml.safe_dump(of_kind(objects, "NodePool")[0]))
    pool["spec"]["disruption"]["consolidateWhen"] = pool["spec"]["disruption"].pop(
        "consolidationPolicy")
    assert list(validators["NodePool"].iter_errors(pool))
    node_class = yaml.safe_load(yaml.safe_dump(of_kind(objects, "EC2NodeClass")[0]))
    node_class["spec"]["metadataOptions"]["httpTokens"] = "optional-ish"
    assert list(validators["EC2NodeClass"].iter_errors(node_class))


def test_nodes_carry_the_labels_pods_select_on_and_the_gpu_operator_reads(objects, catalog):
    device_plugin = next(o for o in objects if o["kind"] == "ConfigMap"
                         and o["metadata"]["name"] == gpu_operator.DEVICE_PLUGIN_CONFIG)
    mig = next(o for o in objects if o["kind"] == "ConfigMap"
               and o["metadata"]["name"] == gpu_operator.MIG_PARTED_CONFIG)
    mig_layouts = yaml.safe_load(mig["data"]["config.yaml"])["mig-configs"]
    for node_pool in of_kind(objects, "NodePool"):
        pool = catalog.pool(node_pool["metadata"]["name"])
        labels = node_pool["spec"]["template"]["metadata"]["labels"]
        assert labels["rayplane.io/pool"] == pool.name
        assert pool.labels.items() <= labels.items()
        if pool.sharing.mode.value == "mig":
            assert labels["nvidia.com/mig.config"] in mig_layouts
            assert "nvidia.com/device-plugin.config" not in labels
        elif pool.sharing.mode.value == "time-slicing":
            assert labels["nvidia.com/device-plugin.config"] in device_plugin["data"]
            assert "nvidia.com/mig.config" not in labels
        taints = node_pool["spec"]["template"]["spec"]["taints"]
        assert taints == [{"key": t.key, "value": t.value, "effect": t.effect.value}
                          for t in pool.taints]


def test_a_spot_pool_launches_spot_and_the_others_on_demand(objects, catalog, env):
    def capacity_types(node_pool: dict) -> list[str]:
        return next(r["values"] for r in node_pool["spec"]["template"]["spec"]["requirements"]
                    if r["key"] == "karpenter.sh/capacity-type")

    by_name = {o["metadata"]["name"]: o for o in of_kind(objects, "NodePool")}
    assert catalog.pool("a100-timeslice").capacity_type.value == "SPOT"
    assert capacity_types(by_name["a100-timeslice"]) == ["spot"]
    assert capacity_types(by_name["h100-timeslice"]) == ["on-demand"]
    # Flip the H100 pool to SPOT in a copy of the catalog: its NodePool follows.
    data = catalog.model_dump(mode="json")
    next(p for p in data["pools"] if p["name"] == "h100-timeslice")["capacity_type"] = "SPOT"
    spot = Catalog.parse(data)
    assert capacity_types(karpenter.render_node_pool(spot.pool("h100-timeslice"))) == ["spot"]
    for node_pool in by_name.values():
        types = next(r["values"] for r in node_pool["spec"]["template"]["spec"]["requirements"]
                     if r["key"] == "node.kubernetes.io/instance-type")
        assert types == catalog.pool(node_pool["metadata"]["name"]).instance_types


@pytest.mark.parametrize("max_nodes", [None, 7])
def test_limits_admit_max_nodes_nodes(catalog, env, max_nodes):
    data = catalog.model_dump(mode="json")
    if max_nodes is not None:
        for pool in data["pools"]:
            pool["max_nodes"] = max_nodes
    cat = Catalog.parse(data)
    rendered = [*karpenter.render_karpenter(cat, env),
                gpu_operator.render_device_plugin_config(cat, env),
                gpu_operator.render_mig_config(cat, env)]
    classes = by_name(rendered, "EC2NodeClass")
    for node_pool in of_kind(rendered, "NodePool"):
        pool = cat.pool(node_pool["metadata"]["name"])
        limits = node_pool["spec"]["limits"]
        assert limits["nodes"] == str(pool.max_nodes)
        if "replicas" in node_pool["spec"]:
            # Static: limits.nodes only (the CRD's rule); room for a drift replacement's surge.
            assert set(limits) == {"nodes"} and node_pool["spec"]["replicas"] < pool.max_nodes
            continue
        assert {"cpu", "memory", pool.kubernetes_resource} <= set(limits)
        advertised = advertised_gpus(node_pool, rendered)
        assert nodes_admitted(node_pool, classes[pool.name], advertised) == pool.max_nodes, \
            pool.name
        if advertised and advertised["nvidia.com/gpu"] > pool.gpus_per_node:
            # A limit of 8 per node x max_nodes (the launch-time count) would not do: initialized
            # time-sliced nodes count 24 each, and the pool stalls at a fraction of max_nodes.
            eight = {**node_pool, "spec": {**node_pool["spec"], "limits": {
                **limits, "nvidia.com/gpu": str(pool.gpus_per_node * pool.max_nodes)}}}
            assert nodes_admitted(eight, classes[pool.name], advertised) < pool.max_nodes


def test_a_static_nodepool_with_a_resource_limit_breaks_the_crds_rule(objects):
    static = next(p for p in of_kind(objects, "NodePool") if "replicas" in p["spec"])
    assert not cel_errors(static)
    broken = {**static, "spec": {**static["spec"], "limits": {"nodes": "4", "cpu": "384"}}}
    assert cel_errors(broken) == ["static NodePool limits cpu"]


def test_disruption_removes_only_empty_nodes_one_at_a_time(objects):
    for node_pool in of_kind(objects, "NodePool"):
        disruption = node_pool["spec"]["disruption"]
        assert disruption["consolidationPolicy"] == "WhenEmpty"
        # A static pool is never consolidated (Karpenter ignores the policy there).
        assert disruption["consolidateAfter"] == \
            ("Never" if "replicas" in node_pool["spec"] else karpenter.CONSOLIDATE_AFTER)
        assert disruption["budgets"] == [{"nodes": "1"}]
        assert node_pool["spec"]["template"]["spec"]["expireAfter"] == "720h"


def test_node_classes_use_the_accelerated_al2023_ami_the_node_role_and_discovery_tags(
        objects, catalog, env):
    for node_class in of_kind(objects, "EC2NodeClass"):
        pool = catalog.pool(node_class["metadata"]["name"])
        spec = node_class["spec"]
        # Pinned: "@latest" would roll every GPU node whenever AWS publishes an AMI.
        assert re.fullmatch(r"al2023@v\d{8}", spec["amiSelectorTerms"][0]["alias"])
        # Terraform's name for it (module karpenter), and the contract's rayplane-<env>-...
        assert spec["role"] == f"{env.cluster_name}-karpenter-node" == \
            f"rayplane-{env.name}-karpenter-node"
        discovery = [{"tags": {"karpenter.sh/discovery": env.cluster_name}}]
        assert spec["subnetSelectorTerms"] == discovery
        assert spec["securityGroupSelectorTerms"] == discovery
        assert spec["metadataOptions"]["httpTokens"] == "required"
        assert spec["metadataOptions"]["httpPutResponseHopLimit"] == 1
        root = [b for b in spec["blockDeviceMappings"] if b.get("rootVolume")]
        assert len(root) == 1 and root[0]["ebs"]["volumeSize"] == f"{pool.disk_size_gib}Gi"
        assert root[0]["ebs"]["encrypted"] is True


def test_efa_pools_get_one_efa_per_network_card_in_their_placement_group(objects, catalog, env):
    seen = set()
    for node_class in of_kind(objects, "EC2NodeClass"):
        pool = catalog.pool(node_class["metadata"]["name"])
        spec = node_class["spec"]
        if not pool.efa:
            assert "networkInterfaces" not in spec and "placementGroupSelector" not in spec
            continue
        seen.add(pool.name)
        cards = min(hardware().instance_types[t].efa_interfaces for t in pool.instance_types)
        nics = spec["networkInterfaces"]
        assert [n for n in nics if n["interfaceType"] == "interface"] == \
            [{"networkCardIndex": 0, "deviceIndex": 0, "interfaceType": "interface"}]
        assert sorted(n["networkCardIndex"] for n in nics
                      if n["interfaceType"] == "efa-only") == list(range(cards))
        assert spec["placementGroupSelector"] == {"name": f"{env.cluster_name}-{pool.name}"}
    assert seen == {p.name for p in catalog.gpu_pools if p.efa}
    assert seen, "the production catalog has EFA training pools"
