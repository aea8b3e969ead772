"""The serve config: which models an OpenAI application serves, from where, on which pool,
with which engine and autoscaling, and where its API keys come from.

``ServeAppConfig.from_file(path)`` validates a YAML file (one-line errors naming the field);
``to_serve_config(catalog)`` renders the Ray Serve config that ``serve deploy`` takes and that
a KubeRay RayService carries as ``serveConfigV2`` -- one pure function, no I/O, so what is
deployed locally and on EKS is the same document. ``pin_versions()`` (the CLI's step before
deploying) turns ``models:/NAME@alias`` into the version the alias points at now, so that
promoting a new version and redeploying changes the config and Serve rolls the replicas.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raycluster.catalog import Catalog, Pool
from raycluster.spec import Spec, SpecError

#: Import path of the application builder for each engine (``serve deploy``'s import_path).
APP_BUILDERS = {"cpu": "serve.app:build_app", "vllm": "serve.engines.vllm:build_app"}
INGRESS_DEPLOYMENT = "OpenAIIngress"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class EngineKind(StrEnum):
    cpu = "cpu"
    vllm = "vllm"


class IngressMode(StrEnum):
    #: One FastAPI ingress deployment routes by ``model`` to one deployment per model (as
    #: ``ray.serve.llm`` does): several models, ingress scaled on its own, and a replica that
    #: dies mid-stream is reported inside the stream as retryable.
    router = "router"
    #: The model's replicas answer HTTP themselves (proxy -> replica, one hop less): lower
    #: latency and no ingress CPU, for a one-model CPU app. A replica that dies mid-stream
    #: cuts its open streams (the proxy retries only requests that have not started).
    direct = "direct"


class SourceKind(StrEnum):
    registry = "registry"  # models:/NAME@alias or models:/NAME/VERSION
    run = "run"  # runs:/RUN_ID/path
    s3 = "s3"
    folder = "folder"


def source_kind(source: str) -> SourceKind:
    if source.startswith("models:/"):
        return SourceKind.registry
    if source.startswith("runs:/"):
        return SourceKind.run
    if source.startswith("s3://"):
        return SourceKind.s3
    return SourceKind.folder


def parse_registry_ref(source: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@alias`` -> (NAME, alias, None); ``models:/NAME/3`` -> (NAME, None, '3')."""
    m = _REGISTRY.match(source)
    if not m:
        raise ValueError(f"{source!r} is not a registry reference; use models:/NAME@alias or "
                         "models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


class Autoscaling(Spec):
    """Ray Serve autoscaling of one model's replicas."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 scales to zero "
                                                           "when idle (development).")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(default=None, ge=0,
                                         description="Replicas at deploy (default min_replicas, "
                                                     "at least 1 so the first request is fast).")
    target_ongoing_requests: float = Field(default=8.0, gt=0,
                                           description="Requests per replica the autoscaler "
                                                       "aims for.")
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Sustained load before "
                                                                   "adding replicas, s.")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="Sustained idleness "
                                                                      "before removing, s.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is greater than max_replicas "
                             f"({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie between "
                             f"min_replicas ({self.min_replicas}) and max_replicas "
                             f"({self.max_replicas})")
        return self

    def serve_options(self) -> dict[str, Any]:
        initial = self.initial_replicas
        if initial is None:
            initial = max(1, self.min_replicas)
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": initial,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s}


class ModelSpec(Spec):
    """One served model."""

    name: str = Field(description="Name clients send as `model` (GET /v1/models lists it).")
    source: str = Field(description="Where the weights come from: models:/NAME@alias or "
                                    "models:/NAME/VERSION (MLflow registry), runs:/RUN/PATH, "
                                    "s3://bucket/prefix, or a local Hugging Face folder.")
    pool: str = Field(default="cpu", description="Pool whose nodes run the replicas.")
    engine: EngineKind = Field(default=EngineKind.cpu,
                               description="cpu (torch + transformers) or vllm (GPU pools).")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling,
                                     description="Replica autoscaling.")
    max_num_seqs: int | None = Field(default=None, ge=1, le=1024,
                                     description="Sequences decoded together per replica "
                                                 "(cpu: 16; vllm: derived from the unit's "
                                                 "memory).")
    max_model_len: int | None = Field(default=None, ge=16,
                                      description="Context length served (default: the "
                                                  "model's).")
    max_queued_requests: int = Field(default=64, ge=-1,
                                     description="Requests waiting for a replica beyond which "
                                                 "Serve answers 503 (-1: unbounded).")
    stream_interval_ms: float = Field(default=50, ge=0, le=1000,
                                      description="cpu: a stream's tokens are sent at most "
                                                  "this often after the first (0: every "
                                                  "token as its own event message).")
    cpus: float = Field(default=1.0, ge=0,
                        description="CPU cores per replica (the CPU engine's torch threads). "
                                    "On a GPU pool the unit's share of the node comes with it.")
    gpu_units: int = Field(default=1, ge=1, description="vllm: GPU units (whole GPUs, "
                                                        "time-slice replicas or MIG instances) "
                                                        "per replica.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs one replica "
                                                                   "shards the model over "
                                                                   "(whole GPUs only).")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="vllm: fraction of the visible GPU memory the "
                                              "engine takes (default: derived from the pool's "
                                              "sharing; may only be lowered).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="vllm: further engine arguments.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _MODEL_NAME.match(v):
            raise ValueError("must start with a letter or digit and hold only letters, digits "
                             "and . _ : / - (at most 128 characters)")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if v.startswith("models:/"):
            parse_registry_ref(v)
        elif "://" in v and not v.startswith(("s3://", "runs:/")):
            raise ValueError(f"{v!r}: unsupported scheme; use models:/NAME@alias, runs:/, "
                             "s3:// or a local folder")
        return v

    @field_validator("engine_kwargs")
    @classmethod
    def _derived_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("gpu_memory_utilization", "max_num_seqs", "tensor_parallel_size",
                    "max_model_len"):
            if key in v:
                raise ValueError(f"{key}: set it as the model's own field '{key}', where "
                                 "rayplane checks it against the pool")
        return v

    @property
    def deployment_name(self) -> str:
        return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    @property
    def source_kind(self) -> SourceKind:
        return source_kind(self.source)


class ApiKeys(Spec):
    """Where the OpenAI endpoint's API keys are read (by the ingress replicas, at start and
    when the file changes). Never the keys themselves: a config is not a secret."""

    env: str | None = Field(default=None, description="Environment variable holding the keys "
                                                      "(comma-separated), e.g. from a "
                                                      "Kubernetes Secret.")
    file: str | None = Field(default=None, description="File with one key per line (absolute "
                                                       "path on the Ray nodes).")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeys:
        if not self.env and not self.file:
            raise ValueError("name an env variable or a file (or both) holding the keys")
        if self.env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.env):
            raise ValueError(f"env: {self.env!r} is not an environment variable name")
        return self


class IngressSpec(Spec):
    mode: IngressMode = Field(default=IngressMode.router, description=(
        "router: an ingress deployment routes to one deployment per model; direct: the one "
        "model's replicas answer HTTP themselves (one hop less). replicas, cpus, pool and "
        "max_ongoing_requests apply to router."))
    replicas: int = Field(default=1, ge=1, description="Ingress (router) replicas.")
    cpus: float = Field(default=0.1, ge=0, description="CPU cores per ingress replica.")
    pool: str = Field(default="cpu", description="Pool of the ingress replicas.")
    max_ongoing_requests: int = Field(default=256, ge=1,
                                      description="Concurrent requests per ingress replica.")


class HttpSpec(Spec):
    host: str = Field(default="127.0.0.1", description="Address Serve's HTTP proxy binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP proxy.")
    proxy_location: Literal["HeadOnly", "EveryNode", "Disabled"] = Field(
        default="HeadOnly", description="Where HTTP proxies run (HeadOnly on one host).")


class ServeAppConfig(Spec):
    """An OpenAI-compatible Serve application."""

    spec_kind = "serve config"

    name: str = Field(default="openai", description="Serve application name.")
    route_prefix: str = Field(default="/", description="HTTP route prefix of the app.")
    models: list[ModelSpec] = Field(min_length=1, description="Served models.")
    api_keys: ApiKeys | None = Field(default=None, description="Where the API keys are read.")
    allow_unauthenticated: bool = Field(default=False,
                                        description="Serve without API keys (must be said "
                                                    "explicitly; never in production).")
    mlflow_tracking_uri: str | None = Field(default=None,
                                            description="MLflow server that models:/ and runs:/ "
                                                        "sources resolve against (default: the "
                                                        "nodes' MLFLOW_TRACKING_URI).")
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="The router.")
    http: HttpSpec = Field(default_factory=HttpSpec, description="Serve's HTTP proxy.")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServeAppConfig:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"models[{i}].name: {m.name!r} is also models[{seen[m.name]}]"
                                 "; served names must be unique")
            seen[m.name] = i
        deployments = [m.deployment_name for m in self.models]
        if len(set(deployments)) != len(deployments):
            raise ValueError("models: two names map to the same deployment name "
                             f"({deployments}); rename one")
        kinds = {m.engine for m in self.models}
        if len(kinds) > 1:
            first = self.models[0].engine
            i = next(i for i, m in enumerate(self.models) if m.engine != first)
            raise ValueError(f"models[{i}].engine: {self.models[i].engine.value!r} differs from "
                             f"models[0].engine {first.value!r}; one application serves one "
                             "engine kind, write a second serve config")
        if self.ingress.mode is IngressMode.direct:
            if len(self.models) != 1:
                raise ValueError(f"ingress.mode: 'direct' serves one model and this config has "
                                 f"{len(self.models)}; use 'router' to serve several")
            if self.engine is not EngineKind.cpu:
                raise ValueError("ingress.mode: 'direct' is for the cpu engine; vllm apps use "
                                 "ray.serve.llm's router (use 'router')")
        if self.api_keys is None and not self.allow_unauthenticated:
            raise ValueError("api_keys: required (an env variable or a file holding the keys);"
                             " set allow_unauthenticated: true to serve without keys")
        if self.api_keys is not None and self.allow_unauthenticated:
            raise ValueError("allow_unauthenticated: true contradicts api_keys; keep one")
        return self

    @property
    def engine(self) -> EngineKind:
        return self.models[0].engine

    # -- rendering -------------------------------------------------------------------------

    def to_serve_config(self, catalog: Catalog) -> dict[str, Any]:
        """The Ray Serve config (``serve deploy`` / RayService ``serveConfigV2``)."""
        ingress_pool = catalog.pool(self.ingress.pool, "ingress.pool")
        for i, m in enumerate(self.models):
            pool = catalog.pool(m.pool, f"models[{i}].pool")
            if m.engine is EngineKind.vllm:
                from serve.engines.vllm import check_placement

                check_placement(m, pool, f"models[{i}]")
        if self.engine is EngineKind.vllm:
            from serve.engines.vllm import vllm_application

            app = vllm_application(self, catalog)
        else:
            app = self._cpu_application(catalog, ingress_pool)
        return {
            "proxy_location": self.http.proxy_location,
            "http_options": {"host": self.http.host, "port": self.http.port},
            "applications": [app],
        }

    def app_args(self) -> dict[str, Any]:
        """What the application builder receives (``args`` of the Serve config)."""
        args: dict[str, Any] = {
            "models": [{"name": m.name, "source": m.source,
                        "max_num_seqs": m.max_num_seqs or 16,
                        "max_model_len": m.max_model_len,
                        "threads": max(1, round(m.cpus)),
                        "stream_interval_ms": m.stream_interval_ms,
                        "deployment": m.deployment_name} for m in self.models],
            "api_keys": self.api_keys.model_dump() if self.api_keys else None,
            "mlflow_tracking_uri": self.mlflow_tracking_uri,
        }
        if self.ingress.mode is IngressMode.direct:
            args["ingress_mode"] = IngressMode.direct.value
        return args

    def _cpu_application(self, catalog: Catalog, ingress_pool: Pool) -> dict[str, Any]:
        direct = self.ingress.mode is IngressMode.direct
        deployments = [] if direct else [{
            "name": INGRESS_DEPLOYMENT,
            "num_replicas": self.ingress.replicas,
            "max_ongoing_requests": self.ingress.max_ongoing_requests,
            "ray_actor_options": _actor_resources(ingress_pool, self.ingress.cpus,
                                                  units=self.ingress.cpus),
        }]
        for m in self.models:
            pool = catalog.pool(m.pool)
            max_num_seqs = m.max_num_seqs or 16
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
                "ray_actor_options": _actor_resources(
                    pool, m.cpus, units=m.cpus if not pool.has_gpu else 1),
            })
        app: dict[str, Any] = {
            "name": self.name,
            "route_prefix": self.route_prefix,
            "import_path": APP_BUILDERS["cpu"],
            "args": self.app_args(),
            "deployments": deployments,
        }
        if self.mlflow_tracking_uri:
            app["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": self.mlflow_tracking_uri}}
        return app

    # -- registry --------------------------------------------------------------------------

    def pin_versions(self, tracking_uri: str | None = None) -> ServeAppConfig:
        """A copy whose ``models:/NAME@alias`` sources name the version the alias points at
        now (``models:/NAME/VERSION``); a missing model or alias is a SpecError naming the
        field. Deploying the pinned config makes an alias move a config change."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=tracking_uri or self.mlflow_tracking_uri)
        pinned = self.model_copy(deep=True)
        for i, m in enumerate(pinned.models):
            if m.source_kind is not SourceKind.registry:
                continue
            name, alias, version = parse_registry_ref(m.source)
            field = f"models[{i}].source"
            try:
                if alias:
                    version = client.get_model_version_by_alias(name, alias).version
                else:
                    client.get_model_version(name, version)
            except MlflowException as err:
                raise SpecError(_registry_error(client, field, m.source, name, alias, err),
                                field=field) from None
            m.source = f"models:/{name}/{version}"
        return pinned

    def check_sources(self) -> None:
        """Refuse a local folder that is not a model folder before anything is deployed."""
        for i, m in enumerate(self.models):
            if m.source_kind is SourceKind.folder:
                path = Path(m.source)
                if not (path / "config.json").is_file():
                    raise SpecError(f"models[{i}].source: {m.source!r} is not a Hugging Face "
                                    "model folder (no config.json)", field=f"models[{i}].source")


def _actor_resources(pool: Pool, cpus: float, units: float) -> dict[str, Any]:
    """Ray actor options of a CPU-engine replica (or the ingress) on ``pool``.

    On the CPU pool it takes ``cpus`` cores and as much of the pool resource (which counts
    cores there). On a GPU pool it takes pool units and no Ray CPUs: locally those nodes have
    ``num-cpus 0`` (the head owns the cores), and on EKS a unit's share of the node comes
    with the unit."""
    if pool.has_gpu:
        return {"num_cpus": 0, "resources": {pool.ray_resource: float(units)}}
    return {"num_cpus": cpus, "resources": {pool.ray_resource: float(units)}}


def _registry_error(client, field: str, source: str, name: str, alias: str | None,
                    err: Exception) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            names = sorted(r.name for r in client.search_registered_models(max_results=50))
        except MlflowException:
            names = []
        from raycluster.spec import did_you_mean

        return (f"{field}: {source!r}: no registered model {name!r}{did_you_mean(name, names)}"
                f"; registered: {', '.join(names) or 'none'}")
    if alias:
        aliases = sorted(getattr(model, "aliases", {}) or {})
        return (f"{field}: {source!r}: model {name!r} has no alias {alias!r}; aliases: "
                f"{', '.join(aliases) or 'none'}")
    return f"{field}: {source!r}: {err.message if hasattr(err, 'message') else err}"


def load_serve_config(path: str | Path) -> ServeAppConfig:
    return ServeAppConfig.from_file(path)


__all__ = [
    "APP_BUILDERS",
    "INGRESS_DEPLOYMENT",
    "ApiKeys",
    "Autoscaling",
    "EngineKind",
    "HttpSpec",
    "IngressMode",
    "IngressSpec",
    "ModelSpec",
    "ServeAppConfig",
    "SourceKind",
    "load_serve_config",
    "parse_registry_ref",
    "source_kind",
]
