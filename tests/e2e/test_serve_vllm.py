"""vLLM on a GPU: the app that ``serve.engines.vllm:build_app`` builds from a serve config
(Ray's ``ray.serve.llm`` with rayplane's pool-derived settings), serving the platform's model
folder through the official openai client, API key enforced.

Needs an NVIDIA GPU and vLLM (``uv sync --extra gpu`` on a GPU node); skipped otherwise. On
this project's CPU machines vLLM cannot be installed: the config building is unit-tested in
tests/unit/serve/test_vllm_config.py.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import requires_gpu

pytestmark = [requires_gpu, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="needs vLLM: `uv sync --extra gpu` on a GPU machine")]


def test_vllm_app_serves_the_model_folder(tmp_path, monkeypatch):
    import openai
    import ray
    from openai import OpenAI
    from ray import serve

    from raycluster.catalog import load_catalog
    from serve.builder import to_serve_config
    from serve.config import ServeAppConfig
    from serve.engines.vllm import build_app
    from tests.support import tiny_model as tm

    folder = tm.make_tiny_model(tmp_path / "model")
    keys = tmp_path / "keys"
    keys.write_text("rp-e2e-key\n")
    cfg = ServeAppConfig.parse({
        "models": [{"name": "tiny-chat", "source": str(folder), "pool": "a100-timeslice",
                    "engine": "vllm", "max_model_len": 256}],
        "api_keys": {"file": str(keys)}})
    (app,) = to_serve_config(cfg, load_catalog())["applications"]
    (llm,) = app["args"]["llm_configs"]
    assert llm["engine_kwargs"]["gpu_memory_utilization"] == 0.3  # a third of the GPU
    llm["accelerator_type"] = None  # whatever GPU this machine has stands in for the A100
    ray.init(resources={"pool:a100-timeslice": 1, "pool:cpu": 1})
    try:
        serve.run(build_app(app["args"]), route_prefix="/", blocking=False)
        client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="rp-e2e-key")
        r = client.chat.completions.create(model="tiny-chat", messages=tm.GREETING,
                                           temperature=0, max_tokens=40)
        assert r.choices[0].message.content == tm.GREETING_REPLY
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="wrong",
                   max_retries=0).models.list()
    finally:
        serve.shutdown()
        ray.shutdown()
