"""Any pool catalog is either refused in one line naming the field, or renders objects that
Kubernetes and its operators accept: the KubeRay RayCluster of every pool (strictly valid
against the KubeRay 1.7 CRD in ../shared/schemas), the GPU Operator's ClusterPolicy (its CRD)
and ConfigMaps (the EKS version's OpenAPI schema), the Terraform node pools, every name a
DNS label or subdomain. Catalogs are the seed one with a few fields changed at random, to
plausible values (other instance types, sharing modes, MIG profiles, sizes) or hostile ones
(wrong types, negatives, unknown keys)."""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raycluster.catalog import DEFAULT_CATALOG, Catalog
from raycluster.environments import ClusterSpec, load_environment
from raycluster.gpu_operator import render_gpu_operator
from raycluster.hardware import hardware
from raycluster.kuberay import render_raycluster
from raycluster.policy import (
    render_limit_ranges,
    render_namespaces,
    render_priority_classes,
    render_resource_quotas,
)
from raycluster.spec import SpecError
from raycluster.terraform import render_tfvars
from tests.support.crds import strict as _strict

SEED = yaml.safe_load(DEFAULT_CATALOG.read_text())
ENV = load_environment("production")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                           r"[a-z0-9])?)*$")
#: A refusal starts with the path of the field at fault: ``pools[1].sharing.replicas: ...``.
NAMES_FIELD = re.compile(r"^(pools|priority_classes|namespaces)[\[.:]")

HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(),
                    st.text(max_size=12), st.lists(st.integers(0, 3), max_size=2),
                    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2))
INSTANCE_TYPES = sorted(hardware().instance_types)
MIG_PROFILES = sorted({p for m in hardware().gpu_models for p in m.mig_profiles})
NAME = st.one_of(st.sampled_from(["cpu", "gpu-2", "a10g", "x" * 64, "Bad_Name", ""]),
                 st.from_regex(DNS_LABEL, fullmatch=True))
PLAUSIBLE = {
    "name": NAME,
    "instance_types": st.lists(st.sampled_from(INSTANCE_TYPES + ["p9.huge"]), min_size=0,
                               max_size=2),
    "capacity_type": st.sampled_from(["ON_DEMAND", "SPOT", "on_demand"]),
    "min_nodes": st.integers(-1, 12), "max_nodes": st.integers(-1, 12),
    "desired_nodes": st.one_of(st.none(), st.integers(-1, 12)),
    "disk_size_gib": st.integers(0, 500),
    "sharing": st.fixed_dictionaries({"mode": st.sampled_from(["none", "time-slicing", "mig",
                                                               "mps"])},
                                     optional={"replicas": st.integers(-1, 8),
                                               "mig_profile": st.sampled_from(MIG_PROFILES)}),
    "worker": st.fixed_dictionaries({"cpus": st.integers(0, 200),
                                     "memory_gib": st.integers(0, 2000)},
                                    optional={"gpu_units": st.integers(-1, 60)}),
    "priority_class": st.sampled_from(["training", "research", "nope"]),
    "namespace": st.sampled_from(["training", "inference", "agentic", "nope"]),
    "labels": st.dictionaries(st.sampled_from(["team", "tier"]), st.text(max_size=5),
                              max_size=2),
    "taints": st.lists(st.fixed_dictionaries({
        "key": st.sampled_from(["nvidia.com/gpu", "dedicated"]),
        "effect": st.sampled_from(["NoSchedule", "NoExecute", "Sometimes"])}), max_size=2),
}
OTHER = {
    ("priority_classes", "name"): NAME, ("priority_classes", "value"): st.integers(-1, 2 * 10**9),
    ("namespaces", "name"): NAME,
    ("namespaces", "quota"): st.fixed_dictionaries({
        "cpus": st.integers(-1, 500),
        "gpus": st.one_of(st.integers(-1, 50), st.dictionaries(
            st.sampled_from(["nvidia.com/gpu", "nvidia.com/mig-3g.40gb", "nvidia.com/mig-1g.5gb"]),
            st.integers(-1, 50), max_size=2)),
        "memory": st.sampled_from(["640Gi", "1Ti", "12", "lots", "0.5Gi", "512Mi"])}),
}


@st.composite
def catalogs(draw) -> tuple[dict, list[str]]:
    """The seed catalog with one or two fields changed; and the changed top-level keys."""
    doc = copy.deepcopy(SEED)
    changed = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["pool", "pool", "other", "other", "new pool", "drop"]))
        if kind == "pool" or kind == "new pool":
            if kind == "new pool":
                doc["pools"].append(copy.deepcopy(draw(st.sampled_from(SEED["pools"]))))
            pool = draw(st.sampled_from(doc["pools"])) if doc["pools"] else {}
            key = draw(st.sampled_from([*PLAUSIBLE, "min_workers", "gpus"]))
            plausible = PLAUSIBLE.get(key, HOSTILE)
            pool[key] = draw(st.one_of(plausible, plausible, plausible, HOSTILE))
            changed.append("pools")
        elif kind == "other":
            (section, key) = draw(st.sampled_from(sorted(OTHER)))
            entry = draw(st.sampled_from(doc[section]))
            entry[key] = draw(st.one_of(OTHER[(section, key)], OTHER[(section, key)],
                                        HOSTILE))
            changed.append(section)
        else:
            section = draw(st.sampled_from(["pools", "priority_classes", "namespaces"]))
            if doc[section]:
                doc[section].pop(draw(st.integers(0, len(doc[section]) - 1)))
            changed.append(section)
    return doc, changed




class Validators(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case
        return f"<CRD validators {sorted(self)}>"


@pytest.fixture(scope="module")
def crds(schemas_dir) -> dict[str, jsonschema.Draft7Validator]:
    out = Validators()
    for path in (schemas_dir / "kuberay-v1.7.0" / "ray.io_rayclusters.yaml",
                 schemas_dir / "gpu-operator-v26.7.0" / "nvidia.com_clusterpolicies.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(
            _strict(version["schema"]["openAPIV3Schema"]))
    return out


def assert_names_the_field(err: SpecError, changed: list[str]) -> None:
    """One line, starting with the path of a field: the changed one, or one referring to it
    (a pool naming a namespace that was renamed)."""
    message = str(err)
    assert "\n" not in message, f"not one line: {message!r}"
    assert NAMES_FIELD.match(message), f"names no field (changed: {changed}): {message!r}"


def quantity(text: str) -> float:
    """A Kubernetes CPU or memory quantity (the forms rayplane renders) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi|Ti)?", text)
    assert m, f"not a quantity: {text!r}"
    return float(m[1]) * units.get(m[2] or "", 1)


def assert_limits_admissible(limit_range: dict) -> None:
    """The API server refuses a LimitRange whose defaults exceed its max."""
    for item in limit_range["spec"]["limits"]:
        for res, top in item.get("max", {}).items():
            for key in ("default", "defaultRequest"):
                value = item.get(key, {}).get(res)
                assert value is None or quantity(value) <= quantity(top), \
                    f"LimitRange {limit_range['metadata']['namespace']}: {key}.{res} {value} " \
                    f"> max {top}"


def assert_valid(obj: dict, crds: dict) -> None:
    kind, meta = obj["kind"], obj["metadata"]
    assert DNS_SUBDOMAIN.match(meta["name"]), f"{kind} name {meta['name']!r}"
    if "namespace" in meta:
        assert DNS_LABEL.match(meta["namespace"]), f"{kind} namespace {meta['namespace']!r}"
    if kind in crds:
        errors = list(crds[kind].iter_errors(obj))
        assert not errors, f"{kind}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:3])
    else:
        kubernetes_validate.validate(obj, ENV.kubernetes_version, strict=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=catalogs())
def test_a_catalog_is_refused_naming_the_field_or_renders_valid_objects(case, crds):
    doc, changed = case
    try:
        catalog = Catalog.parse(json.loads(json.dumps(doc)), source="")
    except SpecError as err:
        assert_names_the_field(err, changed)
        return
    try:  # Terraform refuses some pools the catalog takes (max_nodes 0): named, one line
        tfvars = render_tfvars(catalog)
    except SpecError as err:
        assert_names_the_field(err, changed)
        return
    # managed node groups (pools without GPUs) and Karpenter pools (GPU pools) together
    assert sorted([*tfvars["node_pools"], *tfvars.get("karpenter_pools", {})]) == sorted(
        p.name for p in catalog.pools)
    for obj in [*render_gpu_operator(catalog, ENV), *render_namespaces(catalog, ENV),
                *render_priority_classes(catalog), *render_resource_quotas(catalog)]:
        assert_valid(obj, crds)
    for obj in render_limit_ranges(catalog):
        assert_valid(obj, crds)
        assert_limits_admissible(obj)
    for pool in catalog.pools:
        namespace = pool.namespace
        cluster = ClusterSpec.parse({"name": "fuzz", "namespace": namespace,
                                     "worker_groups": [{"pool": pool.name}]})
        try:
            obj = render_raycluster(catalog, ENV, cluster)
        except SpecError as err:  # e.g. a worker larger than its namespace's quota
            assert "\n" not in str(err) and err.field, str(err)
            continue
        assert_valid(obj, crds)
        group, = obj["spec"]["workerGroupSpecs"]
        assert group["maxReplicas"] == pool.max_workers >= group["minReplicas"]
