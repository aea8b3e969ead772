"""The node pools Terraform gets from the catalog (raycluster/terraform.py), the committed
pools.auto.tfvars.json against what the catalog renders, and the contract between the rendered
map and the node-pool module's typed variable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raycluster.catalog import Catalog, load_catalog
from raycluster.spec import SpecError
from raycluster.terraform import (
    AMI_TYPE_CPU,
    AMI_TYPE_GPU,
    TERRAFORM_DIR,
    render_tfvars,
    tfvars_path,
    tfvars_text,
    write_tfvars,
)
from tests.support.infra import A10G_POOL

NODE_POOL_VARIABLES = TERRAFORM_DIR / "modules" / "node-pool" / "variables.tf"


def _catalog_with(extra_pool: dict | None = None, **pool_changes: dict) -> Catalog:
    data = load_catalog().model_dump(mode="json")
    for pool in data["pools"]:
        pool.update(pool_changes.get(pool["name"].replace("-", "_"), {}))
    if extra_pool:
        data["pools"].append(extra_pool)
    return Catalog.parse(data)


def test_committed_production_tfvars_match_the_catalog():
    path = tfvars_path("production")
    assert path.is_file(), f"{path} is missing: run `rayplane render` (or write_tfvars)"
    committed = path.read_text()
    assert json.loads(committed) == render_tfvars(load_catalog()), (
        f"{path} drifted from raycluster/data/pools.yaml: re-render it with `rayplane render`")
    assert committed == tfvars_text(load_catalog())


def test_every_catalog_pool_becomes_a_node_group_with_its_shape():
    catalog = load_catalog()
    pools = render_tfvars(catalog)["node_pools"]
    assert list(pools) == [p.name for p in catalog.pools]
    cpu = pools["cpu"]
    assert cpu["instance_types"] == ["m6i.4xlarge", "m7i.4xlarge"]
    assert (cpu["capacity_type"], cpu["ami_type"]) == ("ON_DEMAND", AMI_TYPE_CPU)
    assert (cpu["min_size"], cpu["desired_size"], cpu["max_size"]) == (2, 3, 10)
    assert cpu["disk_size_gib"] == 100
    assert cpu["taints"] == []
    spot = pools["a100-timeslice"]
    assert (spot["capacity_type"], spot["ami_type"]) == ("SPOT", AMI_TYPE_GPU)
    # desired_nodes is unset in the catalog: the node group starts at min_nodes.
    assert (spot["min_size"], spot["desired_size"], spot["max_size"]) == (0, 0, 4)
    assert spot["disk_size_gib"] == 200


def test_gpu_operator_labels_select_time_slicing_or_mig():
    pools = render_tfvars(load_catalog())["node_pools"]
    assert pools["a100-timeslice"]["labels"] == {
        "rayplane.io/pool": "a100-timeslice",
        "nvidia.com/device-plugin.config": "time-slicing-3",
        "nvidia.com/gpu.product-family": "a100",
    }
    assert pools["a100-mig"]["labels"]["nvidia.com/mig.config"] == "all-3g.40gb"
    assert "nvidia.com/device-plugin.config" not in pools["a100-mig"]["labels"]
    assert pools["cpu"]["labels"] == {"rayplane.io/pool": "cpu"}
    for name, pool in pools.items():
        assert pool["labels"] == load_catalog().pool(name).node_labels


def test_taints_use_the_eks_api_spelling():
    pools = render_tfvars(load_catalog())["node_pools"]
    assert pools["h100-timeslice"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]
    catalog = _catalog_with(cpu={"taints": [{"key": "a", "value": "b", "effect": "NoExecute"},
                                            {"key": "c", "effect": "PreferNoSchedule"}]})
    assert [t["effect"] for t in render_tfvars(catalog)["node_pools"]["cpu"]["taints"]] == [
        "NO_EXECUTE", "PREFER_NO_SCHEDULE"]


def test_a_new_catalog_pool_is_a_new_node_pool_without_touching_terraform():
    pools = render_tfvars(_catalog_with(A10G_POOL))["node_pools"]
    assert list(pools)[-1] == "a10g-inference"
    new = pools["a10g-inference"]
    assert new["instance_types"] == ["g5.12xlarge"]
    assert new["labels"]["nvidia.com/device-plugin.config"] == "time-slicing-2"
    assert (new["capacity_type"], new["ami_type"], new["max_size"]) == ("SPOT", AMI_TYPE_GPU, 3)
    # The other pools render exactly as before.
    before = render_tfvars(load_catalog())["node_pools"]
    assert {k: v for k, v in pools.items() if k != "a10g-inference"} == before


def test_a_pool_eks_cannot_build_is_refused_naming_the_field():
    catalog = _catalog_with(h100_timeslice={"max_nodes": 0})
    with pytest.raises(SpecError) as err:
        render_tfvars(catalog)
    assert str(err.value).startswith("pools[3].max_nodes: 0 cannot become an EKS node group")
    assert err.value.field == "pools[3].max_nodes"


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


@pytest.mark.parametrize("variables_tf, variable", [
    (NODE_POOL_VARIABLES, "pools"),
    (TERRAFORM_DIR / "environments" / "production" / "variables.tf", "node_pools"),
])
def test_rendered_pool_fields_are_the_terraform_variable_type(variables_tf: Path, variable: str):
    # Terraform drops unknown object attributes silently; a renamed field would vanish.
    attributes = _object_attributes(variables_tf.read_text(), variable)
    rendered = set(next(iter(render_tfvars(load_catalog())["node_pools"].values())))
    assert attributes == rendered


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
