"""The pool catalog: derived capacity, and every bad catalog refused with the field named."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raycluster.catalog import DEFAULT_CATALOG, Catalog, load_catalog
from raycluster.hardware import gpu_model
from raycluster.spec import SpecError

RAYPLANE = [sys.executable, "-m", "raycluster"]


@pytest.fixture()
def seed() -> dict:
    return yaml.safe_load(DEFAULT_CATALOG.read_text())


def pool_doc(doc: dict, name: str) -> dict:
    return next(p for p in doc["pools"] if p["name"] == name)


def refused(doc: dict) -> str:
    with pytest.raises(SpecError) as err:
        Catalog.parse(doc, source="pools.yaml")
    message = str(err.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_seed_catalog_has_the_four_pools_of_the_design():
    catalog = load_catalog()
    assert [p.name for p in catalog.pools] == ["cpu", "a100-timeslice", "a100-mig",
                                               "h100-timeslice"]
    assert catalog.head_pool.name == "cpu"
    assert {pc.name: pc.value for pc in catalog.priority_classes} == {
        "production-inference": 1000, "critical-agents": 900, "training": 500,
        "research": 100, "development": 50}
    quotas = {ns.name: ns.quota for ns in catalog.namespaces if ns.quota}
    assert (quotas["training"].gpus, quotas["training"].cpus, quotas["training"].memory) == (
        {"nvidia.com/gpu": 32}, 192, "1536Gi")
    assert quotas["inference"].gpus == {"nvidia.com/mig-3g.40gb": 10}
    assert quotas["mlops"].gpus == {} and quotas["mlops"].memory == "64Gi"


def test_derived_capacity_time_slicing():
    pool = load_catalog().pool("a100-timeslice")
    # p4d.24xlarge: 8x A100 40GB, 3 replicas per GPU
    assert pool.gpus_per_node == 8
    assert pool.gpu_units_per_node == 24
    assert pool.memory_per_unit_gb == pytest.approx(40 / 3)
    assert pool.gpu_fraction_per_unit == pytest.approx(1 / 3)
    assert pool.kubernetes_resource == "nvidia.com/gpu"
    assert pool.ray_resources() == {"pool:a100-timeslice": 1.0}
    assert pool.node_labels["nvidia.com/device-plugin.config"] == "time-slicing-3"


def test_derived_capacity_mig():
    pool = load_catalog().pool("a100-mig")
    # p4de.24xlarge: 8x A100 80GB cut into 3g.40gb, 2 per GPU (GPU Operator default config)
    assert pool.gpu_units_per_node == 16
    assert pool.memory_per_unit_gb == 40
    assert pool.gpu_fraction_per_unit == 1.0
    assert pool.kubernetes_resource == "nvidia.com/mig-3g.40gb"
    assert pool.node_labels["nvidia.com/mig.config"] == "all-3g.40gb"


def test_cpu_pool_has_no_gpu_resources():
    pool = load_catalog().pool("cpu")
    assert not pool.has_gpu and pool.gpu_units_per_node == 0
    assert pool.kubernetes_resource is None
    assert pool.ray_resources(2) == {"pool:cpu": 8.0}


def test_mig_profiles_come_from_the_gpu_operator_config():
    a100_40 = gpu_model("A100-40GB").mig_profiles
    a100_80 = gpu_model("A100-80GB").mig_profiles
    assert "3g.40gb" not in a100_40 and "3g.20gb" in a100_40
    assert a100_80["3g.40gb"].instances_per_gpu == 2
    assert a100_80["1g.10gb"].instances_per_gpu == 7
    # the same profile name fits fewer times on the smaller GPU (device-filtered entry)
    assert a100_40["1g.10gb"].instances_per_gpu == 4
    assert gpu_model("H100-80GB").mig_profiles.keys() == a100_80.keys()
    assert gpu_model("A10G").mig_profiles == {}


def test_unknown_pool_lookup_suggests_the_near_miss():
    with pytest.raises(SpecError, match=r"'a100-mgi' is not a pool \(did you mean 'a100-mig'\?\)"):
        load_catalog().pool("a100-mgi")


# -- each bad catalog, one by one ---------------------------------------------------------


def test_mig_profile_the_gpu_cannot_make(seed):
    pool = pool_doc(seed, "a100-mig")
    pool["instance_types"] = ["p4d.24xlarge"]  # A100 40GB
    msg = refused(seed)
    assert msg.startswith("pools.yaml: pools[2].sharing.mig_profile: '3g.40gb' is not a MIG "
                          "profile of A100-40GB")
    assert "valid: 1g.5gb, 1g.10gb, 2g.10gb, 3g.20gb, 4g.20gb, 7g.40gb" in msg


def test_time_slice_replicas_below_one(seed):
    pool_doc(seed, "a100-timeslice")["sharing"]["replicas"] = 0
    msg = refused(seed)
    assert "pools[1].sharing" in msg and "replicas must be >= 1" in msg and "got 0" in msg


def test_duplicate_pool_names(seed):
    dup = copy.deepcopy(pool_doc(seed, "a100-mig"))
    seed["pools"].append(dup)
    assert "pools[4].name: duplicate name 'a100-mig'" in refused(seed)


def test_taint_without_effect(seed):
    pool_doc(seed, "h100-timeslice")["taints"] = [{"key": "nvidia.com/gpu", "value": "true"}]
    assert refused(seed) == "pools.yaml: pools[3].taints[0].effect: field required"


def test_taint_with_an_effect_kubernetes_does_not_know(seed):
    pool_doc(seed, "h100-timeslice")["taints"][0]["effect"] = "NoSchedul"
    msg = refused(seed)
    assert "pools[3].taints[0].effect: 'NoSchedul':" in msg
    assert "did you mean 'NoSchedule'?" in msg


def test_min_nodes_greater_than_max(seed):
    pool = pool_doc(seed, "cpu")
    pool["min_nodes"], pool["max_nodes"] = 5, 2
    pool.pop("desired_nodes")
    assert "pools[0]: min_nodes (5) is greater than max_nodes (2)" in refused(seed)


def test_unknown_field_names_the_near_miss(seed):
    pool_doc(seed, "cpu")["max_node"] = 3
    msg = refused(seed)
    assert msg.startswith("pools.yaml: pools[0].max_node: unknown field (did you mean "
                          "'max_nodes'?)")


def test_renamed_field_names_its_replacement(seed):
    pool_doc(seed, "cpu")["max_workers"] = 3
    assert "pools[0].max_workers: 'max_workers' was renamed to 'max_nodes'" in refused(seed)


def test_worker_larger_than_a_node(seed):
    pool_doc(seed, "a100-mig")["worker"]["gpu_units"] = 17
    assert "worker.gpu_units: 17 is more than a node of the pool holds (16 units" in refused(seed)


def test_worker_that_fits_the_instance_but_not_its_allocatable(seed):
    # 96 vCPUs on a p4de.24xlarge, ~95.2 left once the kubelet and the DaemonSets have theirs
    pool_doc(seed, "a100-mig")["worker"]["cpus"] = 96
    msg = refused(seed)
    assert msg.startswith("pools.yaml: pools[2]") and "worker.cpus: 96 CPUs" in msg
    assert "p4de.24xlarge node of pool 'a100-mig'" in msg and "95.165 CPUs are left" in msg


def test_efa_needs_an_instance_type_with_efa(seed):
    assert {p.name for p in load_catalog().pools if p.efa} == {"a100-timeslice",
                                                               "h100-timeslice"}
    pool_doc(seed, "cpu")["efa"] = True
    assert "efa: true but instance type m6i.4xlarge has no EFA support" in refused(seed)


def test_namespace_priority_classes_must_exist(seed):
    seed["namespaces"][0]["priority_classes"] = ["reserch"]
    msg = refused(seed)
    assert "namespaces[0].priority_classes[0]: 'reserch' is not a priority class" in msg
    assert "did you mean 'research'?" in msg


def test_unknown_priority_class(seed):
    pool_doc(seed, "cpu")["priority_class"] = "critical-agent"
    msg = refused(seed)
    assert "pools[0].priority_class: 'critical-agent' is not a priority class" in msg
    assert "did you mean 'critical-agents'?" in msg


# -- the CLI -------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYPLANE, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_pools_check_exit_codes(tmp_path: Path, seed):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(seed))
    ok = run_cli("pools", "check", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "ok (4 pools" in ok.stdout

    pool_doc(seed, "a100-timeslice")["sharing"]["replicas"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(seed))
    res = run_cli("pools", "check", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pools[1].sharing" in lines[0] and "Traceback" not in res.stderr

    missing = run_cli("pools", "check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_pools_show_prints_derived_capacity():
    res = run_cli("pools", "show", "--json")
    assert res.returncode == 0, res.stderr
    import json

    rows = {r["pool"]: r for r in json.loads(res.stdout)}
    assert rows["a100-mig"]["gpu_units_per_node"] == 16
    assert rows["a100-mig"]["kubernetes_resource"] == "nvidia.com/mig-3g.40gb"
    table = run_cli("pools", "show")
    assert table.returncode == 0 and "h100-timeslice" in table.stdout
