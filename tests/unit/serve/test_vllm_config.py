"""vLLM on the GPU pools: the LLMConfig rayplane derives from a pool, checked by Ray's own
LLMConfig model. vLLM itself is not installed here (and ``ray.serve.llm`` cannot be imported
without it), so the deployment runs in tests/e2e on a GPU."""

from __future__ import annotations

import asyncio
import copy

import pytest
import yaml

from raycluster.catalog import DEFAULT_CATALOG, Catalog, load_catalog
from raycluster.spec import SpecError
from serve.builder import to_serve_config
from serve.config import ModelSpec, ServeAppConfig
from serve.engines.vllm import MlflowModelDownload
from serve.engines.vllm_config import (
    check_placement,
    derived_gpu_memory_utilization,
    derived_max_num_seqs,
    llm_config_dict,
    validate_llm_config,
)


def model(**kw) -> ModelSpec:
    return ModelSpec.parse({"name": "chat", "source": "s3://models/chat/v3", "engine": "vllm",
                            **kw})


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def whole_gpu_catalog() -> Catalog:
    doc = yaml.safe_load(DEFAULT_CATALOG.read_text())
    pool = copy.deepcopy(next(p for p in doc["pools"] if p["name"] == "a100-mig"))
    pool.update(name="a100-whole", sharing={"mode": "none"},
                worker={"gpu_units": 8, "cpus": 64, "memory_gib": 512})
    doc["pools"].append(pool)
    return Catalog.parse(doc)


def test_ray_serve_llm_needs_vllm_but_its_llm_config_does_not():
    with pytest.raises(ImportError, match="vLLM"):
        import ray.serve.llm  # noqa: F401
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    assert "accelerator_type" in LLMConfig.model_fields


@pytest.mark.parametrize("pool, utilization, seqs", [
    # A time-slice replica sees the whole 40 GB A100 but owns a third of it.
    ("a100-timeslice", 0.3, 104),
    # A MIG 3g.40gb instance sees only its own 40 GB: vLLM's fraction is of that.
    ("a100-mig", 0.9, 256),
    ("h100-timeslice", 0.3, 208),
])
def test_memory_and_sequences_follow_the_pools_sharing(catalog, pool, utilization, seqs):
    p = catalog.pool(pool)
    assert derived_gpu_memory_utilization(p) == utilization
    assert derived_max_num_seqs(p) == seqs
    cfg = llm_config_dict(model(pool=pool), p)
    assert cfg["engine_kwargs"]["gpu_memory_utilization"] == utilization
    assert cfg["engine_kwargs"]["max_num_seqs"] == seqs
    llm = validate_llm_config(cfg)  # Ray's own model accepts it
    assert llm.accelerator_type == p.gpu_model.ray_accelerator_type
    assert llm.model_id == "chat"


def test_three_timeslice_replicas_fit_one_gpu(catalog):
    p = catalog.pool("a100-timeslice")
    assert p.sharing.replicas * derived_gpu_memory_utilization(p) <= 0.9 + 1e-9


@pytest.mark.parametrize("pool, reason", [
    ("a100-timeslice", "time-slice replicas"),
    ("a100-mig", "MIG 3g.40gb instances"),
])
def test_tensor_parallelism_is_refused_on_shared_gpus_with_the_reason(catalog, pool, reason):
    with pytest.raises(SpecError) as err:
        check_placement(model(pool=pool, tensor_parallel_size=2), catalog.pool(pool),
                        "models[0]")
    assert str(err.value).startswith("models[0].tensor_parallel_size: 2 needs whole GPUs")
    assert reason in str(err.value)


def test_tensor_parallelism_on_whole_gpus_packs_one_node(whole_gpu_catalog):
    p = whole_gpu_catalog.pool("a100-whole")
    m = model(pool="a100-whole", tensor_parallel_size=4)
    check_placement(m, p, "models[0]")
    cfg = llm_config_dict(m, p)
    assert cfg["placement_group_config"] == {
        "bundles": [{"GPU": 1, "pool:a100-whole": 1, "CPU": 1.0}] * 4,
        "strategy": "STRICT_PACK"}
    assert cfg["engine_kwargs"]["tensor_parallel_size"] == 4
    validate_llm_config(cfg)
    with pytest.raises(SpecError, match="more than the 8 GPUs"):
        check_placement(model(pool="a100-whole", tensor_parallel_size=16), p, "models[0]")


def test_memory_above_the_units_share_is_refused(catalog):
    with pytest.raises(SpecError) as err:
        check_placement(model(pool="a100-timeslice", gpu_memory_utilization=0.9),
                        catalog.pool("a100-timeslice"), "models[0]")
    assert "models[0].gpu_memory_utilization: 0.9 is more than a unit of pool " \
           "'a100-timeslice' may take (0.3" in str(err.value)
    m = model(pool="a100-timeslice", gpu_memory_utilization=0.25)  # lowering is fine
    assert llm_config_dict(m, catalog.pool("a100-timeslice"))["engine_kwargs"][
        "gpu_memory_utilization"] == 0.25


def test_vllm_on_the_cpu_pool_is_refused(catalog):
    doc = {"models": [{"name": "chat", "source": "s3://m/chat", "engine": "vllm",
                       "pool": "cpu"}], "allow_unauthenticated": True}
    with pytest.raises(SpecError, match="models\\[0\\].pool: 'cpu' has no GPU"):
        to_serve_config(ServeAppConfig.parse(doc), catalog)


def test_sources_become_ray_mirrors_or_an_mlflow_download(catalog):
    p = catalog.pool("a100-mig")
    s3 = llm_config_dict(model(pool="a100-mig"), p)
    assert s3["model_loading_config"]["model_source"] == {"bucket_uri": "s3://models/chat/v3"}
    reg = llm_config_dict(model(pool="a100-mig", source="models:/chat/3"), p, "http://mlflow:5000")
    cb = reg["callback_config"]
    assert cb["callback_class"] == "serve.engines.vllm:MlflowModelDownload"
    assert cb["callback_kwargs"]["source"] == "models:/chat/3"
    assert reg["model_loading_config"]["model_source"] == cb["callback_kwargs"]["dest"]
    other = llm_config_dict(model(pool="a100-mig", source="models:/chat/4"), p)
    assert other["model_loading_config"]["model_source"] != cb["callback_kwargs"]["dest"]
    validate_llm_config(reg)


def test_mlflow_download_callback_fetches_the_registered_folder(tmp_path, tiny_model):
    """The callback vLLM replicas run, against a real (file-backed) MLflow registry."""
    from tests.support.tiny_model import register_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    import mlflow

    mlflow.set_registry_uri(uri)  # models:/ resolves against this registry
    try:
        version = register_model(tiny_model, "chat", tracking_uri=uri)
        _download(tmp_path, tiny_model, uri, version)
    finally:
        mlflow.set_registry_uri(None)


def _download(tmp_path, tiny_model, uri, version):
    cfg = llm_config_dict(model(pool="a100-mig", source=f"models:/chat/{version}"),
                          load_catalog().pool("a100-mig"), uri)
    cfg["callback_config"]["callback_kwargs"]["dest"] = str(tmp_path / "cache" / "chat")
    llm = validate_llm_config(cfg)
    cb = MlflowModelDownload(llm_config=llm, **cfg["callback_config"]["callback_kwargs"])
    asyncio.run(cb.on_before_node_init())
    got = tmp_path / "cache" / "chat"
    assert (got / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert (got / "model.safetensors").stat().st_size == \
        (tiny_model / "model.safetensors").stat().st_size
