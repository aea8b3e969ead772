"""TrainConfig: the training run spec, its one-line errors, and the Ray resources a worker
asks on each pool (what the KubeRay renderer and train.fit both use)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raycluster.catalog import load_catalog
from raycluster.rayjob import cluster_is_local
from raycluster.spec import SpecError
from train.config import (
    TrainConfig,
    check_cluster_capacity,
    check_pool_capacity,
    local_capacity,
    scaling_config,
    worker_resources,
)

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "train" / "configs"


def cfg(**over) -> TrainConfig:
    base = {"name": "t", "model": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "steps": 10,
            "lr": 1e-3, "batch_size": 4, "checkpoint_every": 5, "storage_path": "/tmp/runs"}
    base.update(over)
    return TrainConfig.parse(base)


def error(**over) -> str:
    with pytest.raises(SpecError) as info:
        cfg(**over)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["ci.yaml", "ci-demo.yaml", "demo.yaml"])
def test_shipped_configs_load(name, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    c = TrainConfig.load(CONFIGS / name)
    assert c.pool in {p.name for p in load_catalog().pools}
    assert c.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert c.checkpoint_every <= c.steps


def test_demo_model_is_a_few_million_parameters_at_most():
    c = TrainConfig.load(CONFIGS / "demo.yaml")
    m = c.model
    per_layer = 12 * m.n_embd ** 2
    assert m.n_layer * per_layer + c.data.vocab_size * m.n_embd < 3_000_000


def test_unknown_field_names_the_near_miss():
    msg = error(checkpoint_evry=5)
    assert "checkpoint_evry: unknown field (did you mean 'checkpoint_every'?)" in msg


def test_nested_field_error_names_the_path():
    msg = error(model={"n_layer": 1, "n_head": 3, "n_embd": 32})
    assert msg.startswith("model.n_embd: 32 is not a multiple of n_head (3)")


def test_cross_field_rule_names_both_fields():
    assert "checkpoint_every: 50 is more than steps (10)" in error(checkpoint_every=50)


def test_relative_storage_path_is_refused():
    msg = error(storage_path="runs")
    assert msg.startswith("storage_path: 'runs': must be an absolute path or a URI")


def test_uri_storage_and_env_defaults(monkeypatch, tmp_path):
    assert cfg(storage_path="s3://bucket/runs").storage_path == "s3://bucket/runs"
    monkeypatch.delenv("RAYPLANE_STORAGE_PATH", raising=False)
    monkeypatch.setenv("RAYPLANE_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = TrainConfig.parse({"name": "t", "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
                           "steps": 2, "lr": 0.1, "batch_size": 1, "checkpoint_every": 1})
    assert c.storage_path == str(tmp_path / "runs")
    assert c.mlflow.tracking_uri is None


def test_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((CONFIGS / "ci.yaml").read_text())
    c = TrainConfig.load(path, ["steps=160", "model.n_layer=1", "storage_path=/tmp/x"])
    assert (c.steps, c.model.n_layer, c.storage_path) == (160, 1, "/tmp/x")
    with pytest.raises(SpecError, match=r"^.*c\.yaml: lr: .*greater than 0"):
        TrainConfig.load(path, ["lr=0"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        TrainConfig.load(path, ["steps"])


def test_kuberay_resources_follow_the_pool():
    catalog = load_catalog()
    for pool in catalog.pools:
        res = worker_resources(catalog, cfg(pool=pool.name), local=False)
        assert res["CPU"] == pool.worker.cpus
        assert res[f"pool:{pool.name}"] == pool.ray_resources(1)[pool.ray_resource]
        if pool.has_gpu:
            assert res["GPU"] == pool.worker.gpu_units
        else:
            assert "GPU" not in res


def test_local_resources_ask_only_the_pool_unit_on_gpu_pools():
    catalog = load_catalog()
    assert worker_resources(catalog, cfg(pool="a100-mig"), local=True) == {
        "CPU": 0.0, "pool:a100-mig": 1.0}
    assert worker_resources(catalog, cfg(pool="cpu"), local=True) == {"CPU": 1.0,
                                                                       "pool:cpu": 1.0}
    sc = scaling_config(catalog, cfg(pool="h100-timeslice", num_workers=2), local=True)
    assert (sc.num_workers, sc.use_gpu) == (2, False)
    sc = scaling_config(catalog, cfg(pool="h100-timeslice", num_workers=2), local=False)
    assert sc.use_gpu and sc.resources_per_worker["GPU"] == 1


def test_unknown_pool_is_named_with_the_valid_ones():
    with pytest.raises(SpecError) as info:
        worker_resources(load_catalog(), cfg(pool="a100-timeslise"), local=False)
    assert str(info.value).startswith("pool: 'a100-timeslise' is not a pool (did you mean "
                                      "'a100-timeslice'?); valid: cpu, a100-timeslice")


def test_more_workers_than_the_pool_holds_is_refused():
    catalog = load_catalog()
    pool = catalog.pool("h100-timeslice")
    check_pool_capacity(catalog, cfg(pool=pool.name, num_workers=pool.max_workers))
    with pytest.raises(SpecError) as info:
        check_pool_capacity(catalog, cfg(pool=pool.name, num_workers=pool.max_workers + 1))
    assert str(info.value).startswith(
        f"num_workers: {pool.max_workers + 1} is more than pool 'h100-timeslice' can hold "
        f"({pool.max_workers} = {pool.workers_per_node} workers per node x 2 nodes)")


# ray.nodes() of the local platform: a head with the cores, one node per GPU pool.
LOCAL_NODES = [
    {"Alive": True, "Resources": {"CPU": 2.0, "pool:cpu": 2.0}},
    {"Alive": True, "Resources": {"pool:a100-timeslice": 2.0}},
    {"Alive": True, "Resources": {"pool:a100-mig": 2.0}},
    {"Alive": False, "Resources": {"pool:a100-mig": 5.0}},
]
KUBERAY_NODES = [
    {"Alive": True, "Resources": {"CPU": 8.0, "pool:cpu": 8.0}},
    {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0, "pool:a100-timeslice": 1.0}},
]


def test_local_platform_is_detected_from_its_nodes():
    catalog = load_catalog()
    assert cluster_is_local(catalog, LOCAL_NODES)
    assert not cluster_is_local(catalog, KUBERAY_NODES)
    assert not cluster_is_local(catalog, LOCAL_NODES[:1])


def test_local_capacity_counts_only_alive_nodes():
    catalog = load_catalog()
    assert local_capacity(catalog, cfg(pool="a100-mig"), LOCAL_NODES) == 2
    assert local_capacity(catalog, cfg(pool="h100-timeslice"), LOCAL_NODES) == 0
    assert local_capacity(catalog, cfg(pool="cpu"), LOCAL_NODES) == 2
    check_cluster_capacity(catalog, cfg(pool="a100-mig", num_workers=2), LOCAL_NODES, True)
    with pytest.raises(SpecError) as info:
        check_cluster_capacity(catalog, cfg(pool="a100-mig", num_workers=3), LOCAL_NODES, True)
    assert str(info.value).startswith("num_workers: 3 workers of pool 'a100-mig'")
    assert "this local cluster, which holds 2" in str(info.value)
    # On KubeRay the autoscaler adds nodes: only the catalog's limit applies.
    check_cluster_capacity(catalog, cfg(pool="a100-mig", num_workers=3), LOCAL_NODES, False)
