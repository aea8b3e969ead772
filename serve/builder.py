"""The Ray Serve config of a serve config: what ``serve deploy`` takes and what a KubeRay
RayService carries as ``serveConfigV2``.

:func:`to_serve_config` is one pure function, no I/O, so what is deployed locally and on EKS is
the same document. It refuses an impossible placement (a pool that does not exist, vLLM on a
pool it cannot run on) with a :class:`~raycluster.spec.SpecError` naming the field, before
anything is deployed.

- ``engine: cpu``, ``triton``, ``openai-upstream`` (mixed at will): rayplane's own app,
  ``serve.app:build_app``, whose ``args`` are :func:`app_args`: one ingress deployment and one
  deployment per model (``router``), or the model's replicas answering HTTP themselves
  (``direct``, cpu only).
- ``engine: vllm``: ``serve.engines.vllm:build_app`` over the ``LLMConfig`` of each model
  (serve/engines/vllm_config.py).
"""

from __future__ import annotations

from typing import Any

from raycluster.catalog import Catalog, Pool
from raycluster.spec import SpecError
from serve.config import EngineKind, IngressMode, ModelSpec, ServeAppConfig
from serve.engines.vllm_config import check_placement, llm_config_dict, validate_llm_config
from serve.online_features import app_specs

#: Import path of the application builder (``serve deploy``'s import_path): rayplane's own
#: app, whose router serves cpu, triton and openai-upstream models alike, and Ray's vLLM app.
APP_BUILDERS = {EngineKind.cpu: "serve.app:build_app",
                EngineKind.vllm: "serve.engines.vllm:build_app"}
#: Name of the CPU app's router deployment.
INGRESS_DEPLOYMENT = "OpenAIIngress"
#: Ray Serve settings of every serving app's replicas (``runtime_env``: Serve reads them when
#: a replica starts; in ``serveConfigV2`` they reach the RayService's replicas the same way).
#: They are the parts of ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` that paid when measured one by one
#: (docs/benchmarks.md, "Serving efficiency"; reasons in docs/serving.md), set one by one so
#: that a Ray release changing what the umbrella switches does not change rayplane's serving.
SERVE_REPLICA_ENV = {
    # The app's code on the replica's own event loop: no thread hop per request and per write.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # The router's handle calls to model replicas over gRPC, not Ray actor calls.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def to_serve_config(config: ServeAppConfig, catalog: Catalog) -> dict[str, Any]:
    """The Ray Serve config (``serve deploy`` / RayService ``serveConfigV2``) of ``config``
    on the pools of ``catalog``."""
    ingress_pool = catalog.pool(config.ingress.pool, "ingress.pool")
    for i, m in enumerate(config.models):
        pool = catalog.pool(m.pool, f"models[{i}].pool")
        if m.engine is EngineKind.vllm:
            check_placement(m, pool, f"models[{i}]")
    if config.is_vllm:
        apps = [vllm_application(config, catalog)]
    elif config.is_mixed_with_vllm:
        routed, vllm = mixed_with_vllm(config)
        apps = [cpu_application(routed, catalog, ingress_pool), vllm_application(vllm, catalog)]
    else:
        apps = [cpu_application(config, catalog, ingress_pool)]
    return {
        "proxy_location": config.http.proxy_location,
        "http_options": {"host": config.http.host, "port": config.http.port},
        "applications": apps,
    }


def vllm_route(config: ServeAppConfig) -> str:
    """Route prefix of the vllm models' own application in a mixed config."""
    return config.route_prefix.rstrip("/") + "/engines/vllm"


def mixed_with_vllm(config: ServeAppConfig) -> tuple[ServeAppConfig, ServeAppConfig]:
    """A mixed config's two applications: vLLM runs behind Ray's own OpenAI ingress
    (``ray.serve.llm``), so its models get an application of their own (``<name>-vllm``,
    same keys, its own route), and the router serves each of them as an ``openai-upstream``
    model calling that application on the Serve proxy of its own node (every node runs one
    on EKS: ``proxy_location: EveryNode``) with the first of the platform's keys. One
    endpoint, one model list; the tenants' limits are counted once, at the router."""
    keys = config.api_keys
    key = {"env": keys.env} if keys.env else {"file": keys.file}
    base_url = f"http://127.0.0.1:{config.http.port}{vllm_route(config)}/v1"
    routed_models = []
    for m in config.models:
        if m.engine is EngineKind.vllm:
            routed_models.append({
                "name": m.name, "source": m.source, "engine": "openai-upstream",
                "pool": m.pool, "max_num_seqs": m.max_num_seqs,
                "upstream": {"base_url": base_url, "model": m.name,
                             "api_key": {**key, "first": True}}})
        else:
            routed_models.append(m.model_dump(mode="json", exclude_none=True))
    base = config.model_dump(mode="json", exclude_none=True)
    routed = ServeAppConfig.model_validate({**base, "models": routed_models})
    vllm = ServeAppConfig.model_validate({
        **{k: v for k, v in base.items() if k not in ("tenants", "default_limits")},
        "name": f"{config.name}-vllm", "route_prefix": vllm_route(config),
        "models": [m.model_dump(mode="json", exclude_none=True)
                   for m in config.models if m.engine is EngineKind.vllm]})
    return routed, vllm


def app_args(config: ServeAppConfig) -> dict[str, Any]:
    """What the CPU app's builder (``serve.app:build_app``) receives: ``args`` of the Serve
    config."""
    args: dict[str, Any] = {
        "models": [_model_args(m) for m in config.models],
        "api_keys": config.api_keys.model_dump() if config.api_keys else None,
        "mlflow_tracking_uri": config.mlflow_tracking_uri,
    }
    limits = config.limits_args()
    if limits is not None:  # tenants (keys by reference) and their limits, serve/limits.py
        args["limits"] = limits
    online = app_specs(config.models)
    if online:  # model name -> the features its chat requests get (serve/online_features.py)
        args["online_features"] = online
    if config.ingress.mode is IngressMode.direct:
        args["ingress_mode"] = IngressMode.direct.value
    return args


def _model_args(m: ModelSpec) -> dict[str, Any]:
    """One model's entry of ``args["models"]``: what its deployment's constructor gets."""
    out: dict[str, Any] = {"name": m.name, "source": m.source, "engine": m.engine.value,
                           "max_num_seqs": m.max_num_seqs or 16,
                           "max_model_len": m.max_model_len,
                           "threads": max(1, round(m.cpus)),
                           "stream_interval_ms": m.stream_interval_ms,
                           "deployment": m.deployment_name}
    if m.triton is not None:
        out["triton"] = {**m.triton.model_dump(mode="json", exclude={"server", "url"}),
                         "url": m.triton_url()}
    if m.upstream is not None:
        out["upstream"] = {**m.upstream.model_dump(mode="json",
                                                   exclude={"server", "base_url", "model_shape"}),
                           "base_url": m.upstream_url()}
    return out


def cpu_application(config: ServeAppConfig, catalog: Catalog, ingress_pool: Pool
                    ) -> dict[str, Any]:
    """The Serve config application of a CPU-engine serve config."""
    direct = config.ingress.mode is IngressMode.direct
    deployments = [] if direct else [{
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": config.ingress.replicas,
        "max_ongoing_requests": config.ingress.max_ongoing_requests,
        "ray_actor_options": _actor_resources(ingress_pool, config.ingress.cpus,
                                              units=config.ingress.cpus),
    }]
    for m in config.models:
        pool = catalog.pool(m.pool)
        max_num_seqs = m.max_num_seqs or 16
        if not m.holds_model:
            # A client of a server elsewhere (an upstream, a Triton container) holds no model:
            # it runs beside the ingress, on its pool and share of a core; ``pool`` names where
            # a server rayplane renders (TGI, Triton) runs.
            resources = _actor_resources(ingress_pool, config.ingress.cpus,
                                         units=config.ingress.cpus)
        else:
            resources = _actor_resources(pool, m.cpus, units=m.cpus if not pool.has_gpu else 1)
        deployments.append({
            "name": m.deployment_name,
            "autoscaling_config": m.autoscaling.serve_options(),
            # A replica takes twice what it decodes at once: the rest wait in its own
            # queue, where a slot frees at the next token, not behind another replica.
            "max_ongoing_requests": 2 * max_num_seqs,
            "max_queued_requests": m.max_queued_requests,
            "graceful_shutdown_timeout_s": 30,
            "health_check_period_s": 5,
            "health_check_timeout_s": 30,
            "ray_actor_options": resources,
        })
    app: dict[str, Any] = {
        "name": config.name,
        "route_prefix": config.route_prefix,
        "import_path": APP_BUILDERS[EngineKind.cpu],
        "args": app_args(config),
        "deployments": deployments,
    }
    app["runtime_env"] = runtime_env(config)
    return app


def vllm_application(config: ServeAppConfig, catalog: Catalog) -> dict[str, Any]:
    """The Serve config application of a vLLM serve config."""
    llm_configs = []
    for i, m in enumerate(config.models):
        pool = catalog.pool(m.pool, f"models[{i}].pool")
        cfg = llm_config_dict(m, pool, config.mlflow_tracking_uri)
        try:
            validate_llm_config(cfg)
        except ValueError as err:
            raise SpecError(f"models[{i}]: Ray's LLMConfig refuses it: "
                            f"{str(err).splitlines()[0]}", field=f"models[{i}]") from None
        llm_configs.append(cfg)
    ingress_pool = catalog.pool(config.ingress.pool, "ingress.pool")
    app: dict[str, Any] = {
        "name": config.name,
        "route_prefix": config.route_prefix,
        "import_path": APP_BUILDERS[EngineKind.vllm],
        "args": {
            "llm_configs": llm_configs,
            "api_keys": config.api_keys.model_dump() if config.api_keys else None,
            "ingress_deployment_config": {
                "num_replicas": config.ingress.replicas,
                "max_ongoing_requests": config.ingress.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": config.ingress.cpus,
                                      "resources": {ingress_pool.ray_resource:
                                                    config.ingress.cpus}},
            },
        },
    }
    limits = config.limits_args()
    if limits is not None:  # tenants and their limits, serve/middleware.py
        app["args"]["limits"] = limits
    online = app_specs(config.models)
    if online:  # attached by serve/features_middleware.py inside the API-key check
        app["args"]["online_features"] = online
    app["runtime_env"] = runtime_env(config)
    return app


def runtime_env(config: ServeAppConfig) -> dict[str, Any]:
    """An app's ``runtime_env``: Serve's settings for its replicas and the tracking server."""
    env = dict(SERVE_REPLICA_ENV)
    if config.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = config.mlflow_tracking_uri
    return {"env_vars": env}


def _actor_resources(pool: Pool, cpus: float, units: float) -> dict[str, Any]:
    """Ray actor options of a CPU-engine replica (or the ingress) on ``pool``.

    On the CPU pool it takes ``cpus`` cores and as much of the pool resource (which counts
    cores there). On a GPU pool it takes pool units and no Ray CPUs: locally those nodes have
    ``num-cpus 0`` (the head owns the cores), and on EKS a unit's share of the node comes
    with the unit."""
    if pool.has_gpu:
        return {"num_cpus": 0, "resources": {pool.ray_resource: float(units)}}
    return {"num_cpus": cpus, "resources": {pool.ray_resource: float(units)}}


__all__ = ["APP_BUILDERS", "INGRESS_DEPLOYMENT", "app_args", "cpu_application",
           "mixed_with_vllm", "to_serve_config", "vllm_application", "vllm_route"]
