"""The OpenAI-compatible Ray Serve application of the CPU engine.

``ingress.mode: router`` (the default): two kinds of deployment, as in ``ray.serve.llm``: one
FastAPI ingress (``OpenAIIngress``, serve/ingress.py: authentication, request validation,
routing by ``model``, OpenAI error bodies) and one deployment per model (``model-<name>``,
serve/model_server.py: the engine and the serving logic, on the model's pool, autoscaled on
its own).

``ingress.mode: direct``: one deployment, ``model-<name>``, whose replicas are the same
``OpenAIIngress`` with the model's ``ModelServer`` inside the replica instead of behind a
handle, so a request crosses the proxy -> replica hop only.

``build_app(args)`` is the ``import_path`` target of the Serve config that
``serve.builder.to_serve_config`` renders; replica counts and resources come from that
config's ``deployments`` section, not from here.
"""

from __future__ import annotations

from ray import serve

from serve.ingress import OpenAIIngress
from serve.model_server import ModelServer


def _server(model: dict):
    """The deployment class of one model: the engine in the replica (cpu, triton: a Triton
    server the replica talks to) or a proxy to an OpenAI-compatible upstream."""
    if model.get("engine") == "openai-upstream":
        from serve.engines.upstream import UpstreamModelServer

        return UpstreamModelServer
    return ModelServer


def build_app(args: dict) -> serve.Application:
    """The application of a serve config's ``args`` (see ``serve.builder.app_args``)."""
    tracking = args.get("mlflow_tracking_uri")
    if args.get("ingress_mode") == "direct":
        (model,) = args["models"]
        return OpenAIIngress.options(name=model["deployment"]).bind(
            None, args.get("api_keys"), in_replica=model, mlflow_tracking_uri=tracking,
            limits=args.get("limits"), online_features=args.get("online_features"))
    models = {m["name"]: _server(m).options(name=m["deployment"]).bind(m, tracking)
              for m in args["models"]}
    return OpenAIIngress.bind(models, args.get("api_keys"), limits=args.get("limits"),
                              online_features=args.get("online_features"))


__all__ = ["build_app"]
