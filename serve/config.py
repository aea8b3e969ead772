"""The serve config: which models an OpenAI application serves, from where, on which pool,
with which engine and autoscaling, and where its API keys come from.

Schema only: ``ServeAppConfig.from_file(path)`` validates a YAML file (one-line errors naming
the field). What is done with a valid config lives beside it: ``serve.builder`` renders the Ray
Serve config (a pure function, the same document locally and on EKS), ``serve.registry``
resolves registry aliases against MLflow, ``serve.deploy`` deploys to a cluster.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raycluster.spec import Spec
from serve.access_specs import (
    ApiKeys,
    RateLimits,
    TenantSpec,
    check_api_keys,
    check_tenants,
)
from serve.online_features import OnlineFeaturesSpec
from serve.server_specs import (
    TGI_PORT,
    TRITON_GRPC_PORT,
    TritonServerKind,
    TritonSpec,
    UpstreamServerKind,
    UpstreamSpec,
    tgi_service,
    triton_service,
)

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class EngineKind(StrEnum):
    #: rayplane's own continuous-batching engine (torch + transformers) in the replica.
    cpu = "cpu"
    #: Ray's ``ray.serve.llm`` over vLLM (GPU pools); an application of its own.
    vllm = "vllm"
    #: A Triton Inference Server the replica speaks KServe v2 gRPC to (serve/engines/triton.py).
    triton = "triton"
    #: Any OpenAI-compatible server outside Ray, proxied (serve/engines/upstream.py).
    openai_upstream = "openai-upstream"



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
    engine: EngineKind = Field(default=EngineKind.cpu, description=(
        "cpu (torch + transformers in the replica), vllm (GPU pools), triton (a Triton "
        "Inference Server) or openai-upstream (any OpenAI-compatible server)."))
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
                                                 "Serve answers 503 (-1: unbounded; 0 is "
                                                 "refused, as Ray refuses it).")
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
    triton: TritonSpec | None = Field(default=None, description=(
        "triton: where its Triton server runs (default: the replica starts one)."))
    upstream: UpstreamSpec | None = Field(default=None, description=(
        "openai-upstream: the OpenAI-compatible server that answers for this model."))
    online_features: OnlineFeaturesSpec | None = Field(default=None, description=(
        "Features of the online store attached to each chat request as a system message, "
        "keyed by the request's metadata (serve/online_features.py)."))

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (unbounded) or at least 1")
        return v

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

    @model_validator(mode="after")
    def _engine_fields(self) -> ModelSpec:
        """The vLLM-only fields mean nothing to the CPU engine: set on a cpu model they would
        size its pods for GPUs it never uses, so they are refused by name."""
        if self.engine is not EngineKind.vllm:
            for name, unset in (("tensor_parallel_size", 1), ("gpu_units", 1),
                                ("gpu_memory_utilization", None), ("engine_kwargs", {})):
                if getattr(self, name) != unset:
                    raise ValueError(f"{name}: is a vllm setting and this model's engine is "
                                     f"{self.engine.value!r}; remove it or set engine: vllm")
        if self.engine is EngineKind.triton and self.triton is None:
            self.triton = TritonSpec()
        if self.triton is not None and self.engine is not EngineKind.triton:
            raise ValueError(f"triton: is for engine 'triton' and this model's engine is "
                             f"{self.engine.value!r}; remove it or set engine: triton")
        if self.engine is EngineKind.openai_upstream and self.upstream is None:
            raise ValueError("upstream: required with engine 'openai-upstream' (its base_url, "
                             "or server: tgi)")
        if self.upstream is not None and self.engine is not EngineKind.openai_upstream:
            raise ValueError(f"upstream: is for engine 'openai-upstream' and this model's "
                             f"engine is {self.engine.value!r}; remove it")
        return self

    @property
    def holds_model(self) -> bool:
        """Whether the model's Serve replicas hold the model (cpu, vllm, a Triton process they
        start) and so take a unit of its pool; else they are gRPC / HTTP clients of a server
        elsewhere (openai-upstream, a Triton container or external server) and run beside the
        ingress, while ``pool`` names where a server rayplane renders runs."""
        if self.engine is EngineKind.openai_upstream:
            return False
        if self.engine is EngineKind.triton:
            return self.triton is not None and self.triton.server is TritonServerKind.process
        return True

    def triton_url(self) -> str | None:
        """The gRPC address of this model's Triton server, None when the replica starts its
        own (``server: process``)."""
        if self.triton is None or self.triton.server is TritonServerKind.process:
            return None
        if self.triton.server is TritonServerKind.container:
            return f"{triton_service(self.deployment_name)}:{TRITON_GRPC_PORT}"
        return self.triton.url

    def upstream_url(self) -> str | None:
        """The OpenAI base URL this model's requests go to (``engine: openai-upstream``)."""
        if self.upstream is None:
            return None
        if self.upstream.server is UpstreamServerKind.tgi:
            return f"http://{tgi_service(self.deployment_name)}:{TGI_PORT}/v1"
        return self.upstream.base_url

    @property
    def deployment_name(self) -> str:
        return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    @property
    def source_kind(self) -> SourceKind:
        return source_kind(self.source)


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
    tenants: list[TenantSpec] = Field(default_factory=list, description=(
        "Tenants, each with its own keys and limits; their keys are accepted besides "
        "api_keys."))
    default_limits: RateLimits = Field(default_factory=RateLimits, description=(
        "Limits of each key of api_keys that no tenant holds (one budget per key)."))
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="The router.")
    http: HttpSpec = Field(default_factory=HttpSpec, description="Serve's HTTP proxy.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty: it names the Serve application")
        return v

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
        if self.is_mixed_with_vllm and self.api_keys is None:
            raise ValueError("api_keys: required beside vllm models in a mixed config (the "
                             "router calls their application with the first of its keys)")
        if self.ingress.mode is IngressMode.direct:
            if len(self.models) != 1:
                raise ValueError(f"ingress.mode: 'direct' serves one model and this config has "
                                 f"{len(self.models)}; use 'router' to serve several")
            if self.engine is not EngineKind.cpu:
                raise ValueError(f"ingress.mode: 'direct' is for the cpu engine and this "
                                 f"model's engine is {self.engine.value!r} (use 'router')")
        self._check_tenants()
        return self

    def _check_tenants(self) -> None:
        limited = bool(self.tenants) or not self.default_limits.unlimited
        if not self.tenants:
            check_api_keys(self.api_keys, self.allow_unauthenticated)
        elif self.allow_unauthenticated:
            raise ValueError("allow_unauthenticated: true contradicts tenants (tenants are "
                             "told apart by their API keys); keep one")
        check_tenants(self.tenants, self.api_keys)
        if not self.default_limits.unlimited and self.api_keys is None:
            raise ValueError("default_limits: they apply to the keys of api_keys that no "
                             "tenant holds, and this config has no api_keys")
        if limited and self.ingress.mode is IngressMode.direct:
            scaling = self.models[0].autoscaling
            if scaling.min_replicas != scaling.max_replicas:
                raise ValueError(
                    "tenants: with ingress.mode 'direct' every model replica enforces an equal "
                    "share of the limits, which needs a fixed replica count: set "
                    "models[0].autoscaling min_replicas = max_replicas, or use 'router'")

    @property
    def engine(self) -> EngineKind:
        """vllm for a vLLM application, else the first model's (rayplane's ingress routes
        cpu, triton and openai-upstream models alike)."""
        return self.models[0].engine

    @property
    def is_vllm(self) -> bool:
        """Every model is vllm: Ray's own OpenAI application alone."""
        return all(m.engine is EngineKind.vllm for m in self.models)

    @property
    def is_mixed_with_vllm(self) -> bool:
        """vllm models beside others: they run in an application of their own, which the
        router reaches as an upstream (serve/builder.py ``mixed_with_vllm``)."""
        kinds = {m.engine for m in self.models}
        return EngineKind.vllm in kinds and len(kinds) > 1

    @property
    def ingress_replicas(self) -> int:
        """Replicas that enforce the limits, each an equal share: the router's, or in
        ``direct`` mode the model's (a fixed count when limits are set)."""
        if self.ingress.mode is IngressMode.direct:
            return max(1, self.models[0].autoscaling.max_replicas)
        return self.ingress.replicas

    def limits_args(self) -> dict[str, Any] | None:
        """What the ingress's key store and limiter receive (``args["limits"]`` of the Serve
        config): the tenants (their keys by reference), the default limits and the replica
        count they are shared by; None when there are neither tenants nor default limits."""
        if not self.tenants and self.default_limits.unlimited:
            return None
        return {"tenants": [t.model_dump(mode="json") for t in self.tenants],
                "default": self.default_limits.model_dump(mode="json"),
                "replicas": self.ingress_replicas}


__all__ = ["ApiKeys", "Autoscaling", "EngineKind", "HttpSpec", "IngressMode",
           "IngressSpec", "ModelSpec", "OnlineFeaturesSpec", "RateLimits", "ServeAppConfig",
           "SourceKind", "TenantSpec", "check_api_keys", "check_tenants", "parse_registry_ref",
           "source_kind"]
