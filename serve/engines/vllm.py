"""vLLM on the GPU pools, the part that runs there: the application builder that
``serve.builder`` names as the ``import_path`` of a vLLM serve config, and the ``ray.serve.llm``
callback that downloads an MLflow model on the node before vLLM starts.

The app is Ray's own: ``LLMServer`` deployments (one per model, from the ``LLMConfig`` that
:mod:`serve.engines.vllm_config` derives from the pool) behind Ray's ``OpenAiIngress``, with
rayplane's API-key check and tenant limits (serve/middleware.py) in front of it. How ``LLMServer`` covers the duties of
the engine interface is in serve/engines/base.py. Needs vLLM (a GPU node); the end-to-end test
is tests/e2e/test_serve_vllm.py.
"""

from __future__ import annotations

import os


def _callback_base():
    from ray.llm._internal.common.callbacks.base import CallbackBase

    return CallbackBase


class MlflowModelDownload(_callback_base()):
    """``ray.serve.llm`` callback: before vLLM loads, put the MLflow model folder where
    ``model_source`` points (once per node; later replicas reuse it)."""

    async def on_before_node_init(self) -> None:
        self.download()

    def download(self) -> str:
        import shutil
        import tempfile
        from pathlib import Path

        from serve.engines.model_source import fetch_model

        dest = Path(self.kwargs["dest"])
        pinned = "@" not in self.kwargs["source"]  # an alias may point elsewhere by now
        if pinned and (dest / "config.json").is_file():
            return str(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        folder = fetch_model(self.kwargs["source"], tracking_uri=self.kwargs.get("tracking_uri"),
                             cache_dir=tmp)
        if not pinned and dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(folder, dest)  # atomic: a concurrent replica sees all or nothing
        except OSError:
            if not (dest / "config.json").is_file():
                raise
        shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)


def build_app(args: dict):
    """``import_path`` target on a GPU cluster: Ray's OpenAI app over ``LLMServer``
    deployments, with the API-key check and the tenants' limits in front of its ingress
    (serve/middleware.py)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import (
        OpenAiIngress,
        init,
        make_fastapi_ingress,
    )
    from ray.serve.llm import LLMConfig, build_llm_deployment

    llm_configs = [LLMConfig.model_validate(c) for c in args["llm_configs"]]
    fastapi_app = init()
    if args.get("online_features"):
        from serve.features_middleware import OnlineFeaturesMiddleware

        # Added first, so it runs inside the API-key check below (the last added is outermost).
        fastapi_app.add_middleware(OnlineFeaturesMiddleware,
                                   online_features=args["online_features"])
    if args.get("api_keys") or args.get("limits"):
        from serve.middleware import TenantMiddleware

        # Built in the replica on its first request, where the key files are.
        fastapi_app.add_middleware(TenantMiddleware, api_keys=args.get("api_keys"),
                                   limits=args.get("limits"))

    deployments = {c.model_id: build_llm_deployment(c) for c in llm_configs}
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in llm_configs}
    options = OpenAiIngress.get_deployment_options(llm_configs)
    options.update(args.get("ingress_deployment_config") or {})
    if "num_replicas" in options:
        options.pop("autoscaling_config", None)
    ingress = make_fastapi_ingress(OpenAiIngress, app=fastapi_app)
    return serve.deployment(ingress, **options).bind(llm_deployments=deployments,
                                                     model_cards=cards)


__all__ = ["MlflowModelDownload", "build_app"]
