"""Capacity that fits (issue 15, finding 6; head PDBs of finding 7).

The scheduling test renders the production environment, takes every pod its Ray workloads may
create at their max replicas (heads with the autoscaler sidecar, workers, RayJob submitters,
each with the Linkerd proxy the namespace injects and the LimitRange defaults the API server
adds), and places them as the scheduler would: onto its pool's nodes (``max_nodes`` of them,
each with its allocatable after kube-reserved, eviction threshold and DaemonSets) and into its
namespace's ResourceQuotas as rendered. Then one test per finding: GPU quotas per resource
name, priority classes per namespace, head PDBs that let a drain through, the stranded units
``rayplane pools show`` prints."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from raycluster.capacity import (
    DAEMONSETS,
    MESH_PROXY_CPU_M,
    MESH_PROXY_MEMORY_MI,
    RunsOn,
    kube_reserved_cpu_m,
    kube_reserved_memory_mi,
    node_budget,
    pool_budgets,
)
from raycluster.catalog import DEFAULT_CATALOG, Catalog, Pool, WorkerShape
from raycluster.cli.pools import pools_app
from raycluster.hardware import InstanceType
from raycluster.karpenter import is_static, static_replicas
from raycluster.render import load_inputs, render_objects
from raycluster.spec import SpecError

REPO = Path(__file__).resolve().parents[3]
LINKERD_VALUES = REPO / "infra/helm/linkerd/control-plane-values.yaml"
RAY_KINDS = ("RayCluster", "RayService", "RayJob", "RayCronJob")
POOL_LABEL = "rayplane.io/pool"


# -- quantities and pods ---------------------------------------------------------------------

_SUFFIX = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3,
           "M": 1e6, "G": 1e9}


def quantity(value: str | int | float) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert m, value
    return float(m[1]) * _SUFFIX[m[2]]


def amounts(resources: dict) -> dict[str, float]:
    """cpu in cores, memory in MiB, anything else (GPU units, pods) as counted."""
    out = {}
    for name, value in resources.items():
        q = quantity(value)
        out[name] = q / 2**20 if name == "memory" else q
    return out


@dataclass
class Pod:
    what: str
    namespace: str
    spec: dict
    containers: list[dict]
    requests: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)

    def admit(self, limit_range: dict | None, proxy: dict | None) -> None:
        """What admission makes of the pod: the Linkerd proxy injected (a native sidecar: its
        requests add to the pod's), and the LimitRange's defaults on containers naming none."""
        containers = self.containers + ([proxy] if proxy else [])
        default: dict = {}
        default_request: dict = {}
        if limit_range:
            item = limit_range["spec"]["limits"][0]
            default, default_request = item.get("default", {}), item.get("defaultRequest", {})
        for c in containers:
            res = c.get("resources", {})
            limits = {**default, **res.get("limits", {})}
            # a request left out is the container's own limit, else the LimitRange's default
            requests = {**default_request, **res.get("limits", {}), **res.get("requests", {})}
            for k, v in amounts(requests).items():
                self.requests[k] = self.requests.get(k, 0.0) + v
            for k, v in amounts(limits).items():
                self.limits[k] = self.limits.get(k, 0.0) + v

    @property
    def pool_selector(self) -> dict:
        return self.spec.get("nodeSelector", {})


def ray_cluster_spec(obj: dict) -> dict:
    spec = obj["spec"]
    return {"RayCluster": lambda: spec, "RayService": lambda: spec["rayClusterConfig"],
            "RayJob": lambda: spec["rayClusterSpec"],
            "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"]}[obj["kind"]]()


def workload_pods(obj: dict) -> list[Pod]:
    """Every pod a Ray workload may have at once: its head (with the autoscaler sidecar
    KubeRay adds), each worker group at maxReplicas x numOfHosts, its submitter."""
    ns, name = obj["metadata"]["namespace"], f"{obj['kind']} {obj['metadata']['name']}"
    rc = ray_cluster_spec(obj)
    head = rc["headGroupSpec"]["template"]["spec"]
    containers = list(head["containers"])
    if rc.get("enableInTreeAutoscaling"):
        containers.append({"name": "autoscaler",
                           "resources": rc["autoscalerOptions"]["resources"]})
    pods = [Pod(f"{name} head", ns, head, containers)]
    for g in rc["workerGroupSpecs"]:
        t = g["template"]["spec"]
        for i in range(g["maxReplicas"] * g.get("numOfHosts", 1)):
            pods.append(Pod(f"{name} worker {g['groupName']}#{i}", ns, t, list(t["containers"])))
    spec = obj["spec"]
    submitter = spec.get("submitterPodTemplate") or spec.get("jobTemplate", {}).get(
        "submitterPodTemplate")
    if submitter:
        pods.append(Pod(f"{name} submitter", ns, submitter["spec"],
                        list(submitter["spec"]["containers"])))
    return pods


def mesh_proxy() -> dict:
    """The proxy container as Linkerd injects it, with the resources its values give it."""
    res = yaml.safe_load(LINKERD_VALUES.read_text())["proxy"]["resources"]
    requests = {k: res[k]["request"] for k in ("cpu", "memory") if res.get(k, {}).get("request")}
    limits = {k: res[k]["limit"] for k in ("cpu", "memory") if res.get(k, {}).get("limit")}
    return {"name": "linkerd-proxy", "resources": {"requests": requests, "limits": limits}}


def admitted_pods(objects: list[dict]) -> list[Pod]:
    meshed = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"
              and o["metadata"].get("annotations", {}).get("linkerd.io/inject") == "enabled"}
    limit_ranges = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "LimitRange"}
    pods = [p for o in objects if o["kind"] in RAY_KINDS for p in workload_pods(o)]
    for pod in pods:
        pod.admit(limit_ranges.get(pod.namespace),
                  mesh_proxy() if pod.namespace in meshed else None)
    return pods


# -- the scheduler and the quota admission, on paper ---------------------------------------


def pool_of(catalog: Catalog, pod: Pod) -> Pool | None:
    """The pool whose nodes the pod can land on: labels its nodeSelector asks for, taints it
    tolerates (the cpu pool for a pod that names no pool and tolerates no taint)."""
    tolerated = {(t.get("key"), t.get("effect")) for t in pod.spec.get("tolerations", [])}
    for pool in catalog.pools:
        if pod.pool_selector.items() <= pool.node_labels.items() and all(
                (t.key, t.effect.value) in tolerated for t in pool.taints):
            return pool
    return None


def node_count(pool: Pool) -> int:
    """The most nodes a pool has: max_nodes, or for a static Karpenter pool (MIG: no instance
    type offers its MIG resource, so Karpenter launches none for a pending pod) the replicas
    it keeps standing."""
    return static_replicas(pool) if is_static(pool) else pool.max_nodes


def schedule(catalog: Catalog, pods: list[Pod]) -> list[str]:
    """First-fit decreasing onto each pool's nodes (``node_count``). One line per pod that fits no
    node, naming its pool."""
    problems = []
    nodes: dict[str, list[dict[str, float]]] = {}
    for pool in catalog.pools:
        free = min((b.free for b in pool_budgets(pool)), key=lambda r: (r.cpu_m, r.memory_mi))
        node = {"cpu": free.cpu_m / 1000, "memory": float(free.memory_mi), "pods": free.pods}
        if pool.kubernetes_resource:
            node[pool.kubernetes_resource] = pool.gpu_units_per_node
        nodes[pool.name] = [dict(node) for _ in range(node_count(pool))]
    order = sorted(pods, key=lambda p: sorted(p.requests.items(), reverse=True), reverse=True)
    for pod in sorted(order, key=lambda p: -max((v for k, v in p.requests.items()
                                                  if k.startswith("nvidia.com/")), default=0)):
        pool = pool_of(catalog, pod)
        if pool is None:
            problems.append(f"{pod.what}: no pool's nodes match {pod.pool_selector}")
            continue
        ask = {**pod.requests, "pods": 1}
        for node in nodes[pool.name]:
            if all(node.get(k, 0) + 1e-9 >= v for k, v in ask.items()):
                for k, v in ask.items():
                    node[k] -= v
                break
        else:
            problems.append(f"pool {pool.name!r}: {pod.what} ({_ask(ask)}) fits none of its "
                            f"{node_count(pool)} nodes ({pool.instance_types[0]})")
    return problems


def _ask(ask: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(ask.items()) if v)


def scope_matches(quota: dict, pod: Pod) -> bool:
    cls = pod.spec.get("priorityClassName", "")
    for e in quota["spec"].get("scopeSelector", {}).get("matchExpressions", []):
        assert e["scopeName"] == "PriorityClass", e
        ok = {"Exists": bool(cls), "DoesNotExist": not cls,
              "In": cls in e.get("values", []), "NotIn": cls not in e.get("values", [])}
        if not ok[e["operator"]]:
            return False
    return True


def quota_problems(objects: list[dict], pods: list[Pod]) -> list[str]:
    """The quota admission: every ResourceQuota of a namespace whose scope matches a pod
    counts it; a quota that tracks limits.cpu refuses a container without one."""
    problems = []
    for quota in (o for o in objects if o["kind"] == "ResourceQuota"):
        ns = quota["metadata"]["namespace"]
        counted = [p for p in pods if p.namespace == ns and scope_matches(quota, p)]
        used: dict[str, float] = {"pods": float(len(counted))}
        for pod in counted:
            for k, v in pod.requests.items():
                used[f"requests.{k}"] = used.get(f"requests.{k}", 0.0) + v
            for k, v in pod.limits.items():
                used[f"limits.{k}"] = used.get(f"limits.{k}", 0.0) + v
        for key, hard in quota["spec"]["hard"].items():
            have = quantity(hard) / (2**20 if key.endswith("memory") else 1)
            if used.get(key, 0.0) > have + 1e-9:
                problems.append(f"namespace {ns!r} quota {quota['metadata']['name']}: {key} "
                                f"{used.get(key, 0.0):g} > {have:g} "
                                f"({', '.join(p.what for p in counted[:3])}...)")
    return problems


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def production(catalog, env) -> list[dict]:
    return render_objects(catalog, env, load_inputs(env))


def with_pool(catalog: Catalog, pool_name: str, **changes) -> Catalog:
    """The catalog with one pool changed, unvalidated: what a catalog that slipped past the
    checks would render or be scheduled on."""
    pools = [p.model_copy(update=changes) if p.name == pool_name else p for p in catalog.pools]
    bad = catalog.model_copy(update={"pools": pools})
    bad.__dict__.pop("by_name", None)  # the cached lookup of the original pools
    return bad


# -- the scheduling test ----------------------------------------------------------------------


def test_every_production_workload_fits_its_pool_and_its_namespace_quota(catalog, production):
    pods = admitted_pods(production)
    assert len(pods) > 40  # heads, workers at max replicas, submitters
    assert schedule(catalog, pods) == []
    assert quota_problems(production, pods) == []


def test_a_worker_that_does_not_fit_its_instance_type_fails_the_schedule_naming_the_pool(
        catalog, env, production):
    # The production pods scheduled on a catalog whose a100-timeslice nodes are g5.2xlarge
    # (32 GiB): its 40 GiB worker fits none of them.
    small = with_pool(catalog, "a100-timeslice", instance_types=["g5.2xlarge"])
    problems = schedule(small, admitted_pods(production))
    # training 12 + research 6 + the RayJob's and cron job's 1 each + the TF RayJob's 2
    assert len(problems) == 22
    assert all(p.startswith("pool 'a100-timeslice': ") and "g5.2xlarge" in p
               for p in problems), problems
    # A worker that fits the instance only on paper (96 vCPUs, ~95.2 free) is refused before
    # anything renders, naming the pool.
    with pytest.raises(SpecError, match="pool 'a100-timeslice'"):
        render_objects(with_pool(catalog, "a100-timeslice", worker=WorkerShape.model_construct(
            gpu_units=1, cpus=96, memory_gib=40)), env, load_inputs(env))


def test_the_catalog_refuses_a_worker_that_fits_the_instance_only_on_paper():
    doc = yaml.safe_load(DEFAULT_CATALOG.read_text())
    pool = next(p for p in doc["pools"] if p["name"] == "a100-timeslice")
    pool["worker"]["memory_gib"] = 1100  # < 1152 GiB of a p4d.24xlarge, > what is allocatable
    with pytest.raises(SpecError) as err:
        Catalog.parse(doc, source="pools.yaml")
    msg = str(err.value)
    assert "worker.memory_gib" in msg and "a100-timeslice" in msg and "p4d.24xlarge" in msg


# -- the numbers behind it ----------------------------------------------------------------------


def test_allocatable_follows_the_eks_ami_formulas():
    assert [kube_reserved_cpu_m(n) for n in (1, 2, 4, 16, 96, 192)] == [60, 70, 80, 110, 310, 550]
    assert kube_reserved_memory_mi(110) == 1465 and kube_reserved_memory_mi(737) == 8362
    # Karpenter's generated instance-type table (AL2023) lists c5.24xlarge -- 96 vCPUs,
    # 192 GiB, 737 pods -- at cpu 95690m, memory 173400Mi: the same formulas.
    c5 = InstanceType(vcpus=96, memory_gib=192, max_pods=737)
    alloc = node_budget("c5.24xlarge", gpu=False, mig_capable=False, efa=False,
                        node=c5).allocatable
    assert (alloc.cpu_m, alloc.memory_mi, alloc.pods) == (95690, 173400, 737)


def test_the_daemonsets_are_one_table_and_run_where_their_kind_of_node_is(catalog):
    names = [d.name for d in DAEMONSETS]
    assert len(names) == len(set(names))
    for wanted in ("aws-node", "kube-proxy", "node-exporter", "linkerd-cni",
                   "nvidia-dcgm-exporter", "nvidia-device-plugin-daemonset",
                   "aws-efa-k8s-device-plugin"):
        assert wanted in names
    by_pool = {p.name: {d.name for d in pool_budgets(p)[0].daemonsets} for p in catalog.pools}
    assert "nvidia-dcgm-exporter" not in by_pool["cpu"]
    assert "aws-efa-k8s-device-plugin" in by_pool["h100-timeslice"]
    assert "aws-efa-k8s-device-plugin" not in by_pool["a100-mig"]  # efa: false
    assert all(d.cpu_m > 0 for d in DAEMONSETS if d.runs_on is not RunsOn.every_node)


def test_the_mesh_proxy_budget_is_linkerds_values():
    res = mesh_proxy()["resources"]["requests"]
    assert quantity(res["cpu"]) * 1000 == MESH_PROXY_CPU_M
    assert quantity(res["memory"]) / 2**20 == MESH_PROXY_MEMORY_MI


def test_production_pools_run_out_of_gpu_units_first_and_strand_none(catalog):
    fits = {p.name: p.fit for p in catalog.pools}
    assert {n: f.workers for n, f in fits.items()} == {
        "cpu": 3, "a100-timeslice": 24, "a100-mig": 16, "h100-timeslice": 24}
    for pool in catalog.gpu_pools:
        assert fits[pool.name].binding == "GPU units", pool.name
        assert fits[pool.name].stranded_units == 0, pool.name
        free = pool_budgets(pool)[0].free
        w = fits[pool.name].workers
        # room left on a full node: at least 5% of its CPU and memory
        assert free.cpu_m - w * (pool.worker.cpus * 1000 + MESH_PROXY_CPU_M) >= 0.05 * free.cpu_m
        assert (free.memory_mi - w * (pool.worker.memory_gib * 1024 + MESH_PROXY_MEMORY_MI)
                >= 0.03 * free.memory_mi), pool.name


# -- finding 6: quotas and priority classes as Kubernetes enforces them --------------------------


def test_gpu_quotas_are_per_resource_name_and_add_up_to_the_namespaces_units(catalog,
                                                                              production):
    quotas = {o["metadata"]["namespace"]: o["spec"]["hard"] for o in production
              if o["kind"] == "ResourceQuota" and o["metadata"]["name"] == "rayplane-quota"}
    for ns in (n for n in catalog.namespaces if n.quota):
        gpu = {k.removeprefix("requests."): int(v) for k, v in quotas[ns.name].items()
               if k.startswith("requests.nvidia.com/")}
        # what Kubernetes admits is the sum over resource names: it must be what was given
        assert sum(gpu.values()) == sum(ns.quota.gpus.values()), ns.name
        assert {k: v for k, v in gpu.items() if v} == ns.quota.gpus, ns.name
    assert quotas["inference"]["requests.nvidia.com/gpu"] == "0"
    assert quotas["training"]["requests.nvidia.com/mig-3g.40gb"] == "0"
    assert quotas["mlops"]["requests.nvidia.com/gpu"] == "0"


def test_quotas_never_promise_more_gpu_units_than_the_pools_can_hold(catalog):
    """Per resource name, the namespaces' quotas together fit what the pools that offer it
    can ever hold at once (a static MIG pool: its standing nodes)."""
    for res in {p.kubernetes_resource for p in catalog.gpu_pools}:
        promised = sum(ns.quota.gpu_units(res) for ns in catalog.namespaces if ns.quota)
        held = sum(p.gpu_units_per_node * node_count(p) for p in catalog.gpu_pools
                   if p.kubernetes_resource == res)
        assert 0 < promised <= held, (res, promised, held)


def test_a_single_number_for_gpus_is_refused_naming_the_field():
    doc = yaml.safe_load(DEFAULT_CATALOG.read_text())
    doc["namespaces"][0]["quota"]["gpus"] = 20
    with pytest.raises(SpecError) as err:
        Catalog.parse(doc, source="pools.yaml")
    assert "namespaces[0].quota.gpus" in str(err.value)
    assert "per resource" in str(err.value)
    doc["namespaces"][0]["quota"]["gpus"] = {"nvidia.com/mig-3g.20gb": 4}
    with pytest.raises(SpecError) as err:
        Catalog.parse(doc, source="pools.yaml")
    assert "nvidia.com/mig-3g.40gb" in str(err.value)  # the valid names


def test_a_namespace_can_use_only_its_priority_classes(catalog, production, env):
    scoped = [o for o in production if o["kind"] == "ResourceQuota"
              and "scopeSelector" in o["spec"]]
    for quota in scoped:
        kubernetes_validate.validate(quota, env.kubernetes_version, strict=True)
    classes = [pc.name for pc in catalog.priority_classes] + ["system-cluster-critical"]
    for ns in (n for n in catalog.namespaces if n.quota):
        quotas = [q for q in scoped if q["metadata"]["namespace"] == ns.name]
        assert quotas, f"namespace {ns.name} has no priority-class quota"
        for cls in classes:
            pod = Pod("probe", ns.name, {"priorityClassName": cls}, [])
            refused = any(scope_matches(q, pod) and q["spec"]["hard"].get("pods") == "0"
                          for q in quotas)
            assert refused == (cls not in ns.allowed_priority_classes), (ns.name, cls)
        classless = Pod("probe", ns.name, {}, [])
        assert not any(scope_matches(q, classless) for q in quotas)
    # every Ray pod rendered for production uses a class its namespace allows
    for pod in admitted_pods(production):
        cls = pod.spec.get("priorityClassName")
        assert cls is None or cls in catalog.namespace(pod.namespace).allowed_priority_classes


# -- finding 7: a drain of the cpu pool goes through ---------------------------------------------


def test_head_pdbs_let_a_node_drain_evict_the_head(production):
    heads = [o for o in production if o["kind"] == "PodDisruptionBudget"
             and o["spec"]["selector"]["matchLabels"].get("rayplane.io/node-type") == "head"]
    assert heads
    for pdb in heads:
        # the disruption controller: allowed = healthy - (expected - maxUnavailable), one head
        expected = healthy = 1
        allowed = healthy - (expected - int(pdb["spec"]["maxUnavailable"]))
        assert allowed >= 1, pdb["metadata"]["name"]


# -- rayplane pools show ------------------------------------------------------------------------


def test_pools_show_prints_workers_per_node_what_binds_and_the_stranded_units(tmp_path):
    doc = yaml.safe_load(DEFAULT_CATALOG.read_text())
    mig = next(p for p in doc["pools"] if p["name"] == "a100-mig")
    mig["worker"]["cpus"] = 8  # the a100-mig: 96 vCPUs hold ~11 workers of 8
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = CliRunner().invoke(pools_app, ["show", "--catalog", str(path), "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["pool"]: r for r in json.loads(out.output)}
    assert (rows["a100-mig"]["workers_per_node"], rows["a100-mig"]["binds"],
            rows["a100-mig"]["stranded_units_per_node"]) == (11, "CPU", 5)
    assert math.isclose(rows["a100-mig"]["free_per_node"]["cpus"], 95.165)
    table = CliRunner().invoke(pools_app, ["show", "--catalog", str(path)])
    assert table.exit_code == 0, table.output
    header = next(ln for ln in table.output.splitlines() if "workers/node" in ln)
    line = next(ln for ln in table.output.splitlines() if "a100-mig" in ln)
    cols = [c.strip() for c in re.split("[┃│]", header)]
    cells = [c.strip() for c in line.split("│")]
    row = dict(zip(cols, cells, strict=True))
    assert (row["workers/node"], row["binds"], row["stranded"]) == ("11", "CPU", "5")
