"""The pools Terraform gets from the catalog (raycluster/terraform.py): pools without GPUs as EKS
managed node groups, GPU pools as Karpenter's (with their EFA option); the committed
pools.auto.tfvars.json against what the catalog renders, and the contract between the rendered
maps and the modules' typed variables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raycluster.catalog import Catalog, load_catalog
from raycluster.spec import SpecError
from raycluster.terraform import (
    AMI_TYPE_CPU,
    TERRAFORM_DIR,
    render_tfvars,
    tfvars_path,
    tfvars_text,
    write_tfvars,
)
from tests.support.infra import A10G_POOL, CPU_POOL

NODE_POOL_VARIABLES = TERRAFORM_DIR / "modules" / "node-pool" / "variables.tf"
KARPENTER_VARIABLES = TERRAFORM_DIR / "modules" / "karpenter" / "variables.tf"
ENV_VARIABLES = TERRAFORM_DIR / "environments" / "production" / "variables.tf"


def _catalog_with(*extra_pools: dict, **pool_changes: dict) -> Catalog:
    data = load_catalog().model_dump(mode="json")
    for pool in data["pools"]:
        pool.update(pool_changes.get(pool["name"].replace("-", "_"), {}))
    data["pools"].extend(extra_pools)
    return Catalog.parse(data)


def test_committed_production_tfvars_match_the_catalog():
    path = tfvars_path("production")
    assert path.is_file(), f"{path} is missing: run `rayplane render` (or write_tfvars)"
    committed = path.read_text()
    assert json.loads(committed) == render_tfvars(load_catalog()), (
        f"{path} drifted from raycluster/data/pools.yaml: re-render it with `rayplane render`")
    assert committed == tfvars_text(load_catalog())


def test_pools_without_gpus_become_node_groups_with_their_shape():
    catalog = load_catalog()
    pools = render_tfvars(catalog)["node_pools"]
    assert list(pools) == [p.name for p in catalog.pools if not p.has_gpu] == ["cpu"]
    cpu = pools["cpu"]
    assert cpu["instance_types"] == ["m6i.4xlarge", "m7i.4xlarge"]
    assert (cpu["capacity_type"], cpu["ami_type"]) == ("ON_DEMAND", AMI_TYPE_CPU)
    assert (cpu["min_size"], cpu["desired_size"], cpu["max_size"]) == (2, 3, 10)
    assert cpu["disk_size_gib"] == 100
    assert cpu["taints"] == []
    assert cpu["labels"] == {"rayplane.io/pool": "cpu"} == catalog.pool("cpu").node_labels


def test_gpu_pools_are_karpenters_not_node_groups_nothing_scales():
    """Finding 1: a GPU pool as a managed node group at 0 nodes stays at 0 (no autoscaler);
    Karpenter provisions them, and Terraform gets only what it makes for them (EFA)."""
    catalog = load_catalog()
    rendered = render_tfvars(catalog)
    gpu_pools = [p.name for p in catalog.pools if p.has_gpu]
    assert gpu_pools == ["a100-timeslice", "a100-mig", "h100-timeslice"]
    assert not set(gpu_pools) & set(rendered["node_pools"])
    assert rendered["karpenter_pools"] == {
        "a100-timeslice": {"efa": True}, "a100-mig": {"efa": False},
        "h100-timeslice": {"efa": True}}
    assert all(rendered["karpenter_pools"][p.name]["efa"] == p.efa for p in catalog.pools
               if p.has_gpu)


def test_taints_use_the_eks_api_spelling():
    catalog = _catalog_with(cpu={"taints": [{"key": "a", "value": "b", "effect": "NoExecute"},
                                            {"key": "c", "effect": "PreferNoSchedule"},
                                            {"key": "d", "effect": "NoSchedule"}]})
    assert [t["effect"] for t in render_tfvars(catalog)["node_pools"]["cpu"]["taints"]] == [
        "NO_EXECUTE", "PREFER_NO_SCHEDULE", "NO_SCHEDULE"]


def test_new_catalog_pools_need_no_terraform_edit():
    before = render_tfvars(load_catalog())
    rendered = render_tfvars(_catalog_with(CPU_POOL, A10G_POOL))
    pools, karpenter = rendered["node_pools"], rendered["karpenter_pools"]
    assert list(pools) == ["cpu", "cpu-batch"]
    new = pools["cpu-batch"]
    assert new["instance_types"] == ["m7i.4xlarge"]
    assert (new["capacity_type"], new["ami_type"], new["max_size"]) == ("ON_DEMAND",
                                                                        AMI_TYPE_CPU, 3)
    # The GPU pool is one more Karpenter pool (g5 has no EFA); the rest renders as before.
    assert karpenter == {**before["karpenter_pools"], "a10g-inference": {"efa": False}}
    assert {k: v for k, v in pools.items() if k != "cpu-batch"} == before["node_pools"]


def test_a_pool_eks_cannot_build_is_refused_naming_the_field():
    catalog = _catalog_with(cpu={"min_nodes": 0, "desired_nodes": 0, "max_nodes": 0})
    with pytest.raises(SpecError) as err:
        render_tfvars(catalog)
    assert str(err.value).startswith("pools[0].max_nodes: 0 cannot become an EKS node group")
    assert err.value.field == "pools[0].max_nodes"


def test_write_tfvars_writes_what_terraform_loads(tmp_path: Path):
    target = tmp_path / "environments" / "staging" / "pools.auto.tfvars.json"
    path = write_tfvars(load_catalog(), target)
    assert path == target
    assert path.is_file()
    assert json.loads(path.read_text()) == render_tfvars(load_catalog())


def _object_attributes(variables_tf: str, variable: str) -> set[str]:
    block = re.search(rf'variable "{variable}" \{{(.*?)\n\}}', variables_tf, re.DOTALL)
    assert block, f"variable {variable!r} not found"
    type_expr = re.search(r"type = map\(object\(\{(.*?)\n  \}\)\)", block[1], re.DOTALL)
    assert type_expr, f"variable {variable!r} is not a typed map of objects"
    return set(re.findall(r"^    ([a-z_]+)\s*=", type_expr[1], re.MULTILINE))


@pytest.mark.parametrize("variables_tf, variable, rendered_map", [
    (NODE_POOL_VARIABLES, "pools", "node_pools"),
    (ENV_VARIABLES, "node_pools", "node_pools"),
    (KARPENTER_VARIABLES, "pools", "karpenter_pools"),
    (ENV_VARIABLES, "karpenter_pools", "karpenter_pools"),
])
def test_rendered_pool_fields_are_the_terraform_variable_type(variables_tf: Path, variable: str,
                                                              rendered_map: str):
    # Terraform drops unknown object attributes silently; a renamed field would vanish.
    attributes = _object_attributes(variables_tf.read_text(), variable)
    rendered = set(next(iter(render_tfvars(load_catalog())[rendered_map].values())))
    assert attributes == rendered


def test_the_rendered_maps_are_the_environments_variables():
    text = ENV_VARIABLES.read_text()
    assert set(render_tfvars(load_catalog())) == {
        name for name in ("node_pools", "karpenter_pools") if f'variable "{name}"' in text}


TF_FILES = sorted(TERRAFORM_DIR.glob("*/**/variables.tf"))


@pytest.mark.parametrize("variables_tf", TF_FILES,
                         ids=lambda p: str(p.parent.relative_to(TERRAFORM_DIR)))
def test_variables_are_typed_described_and_validations_name_the_variable(variables_tf: Path):
    text = variables_tf.read_text()
    blocks = re.findall(r'^variable "([a-z_0-9]+)" \{(.*?)^\}', text, re.DOTALL | re.MULTILINE)
    assert blocks
    for name, body in blocks:
        assert re.search(r"^  type\s*=", body, re.MULTILINE), f"{variables_tf}: {name} is untyped"
        assert re.search(r'^  description\s*=\s*"\S', body, re.MULTILINE), (
            f"{variables_tf}: {name} has no description")
        for message in re.findall(r'error_message\s*=\s*"(.*)"', body):
            assert f"var.{name}" in message, (
                f"{variables_tf}: a validation of {name} does not name it")
