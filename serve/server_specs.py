"""What a serve config says about a model's server when rayplane does not run the model in a
replica itself: a Triton Inference Server (``engine: triton``) or any OpenAI-compatible
server (``engine: openai-upstream``).

Schema only, like serve/config.py beside it. The Triton engine is serve/engines/triton.py;
the upstream proxy is serve/engines/upstream.py; the servers rayplane renders on EKS (the
NVIDIA Triton container, TGI) are raycluster/kuberay/inference_servers.py.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from raycluster.spec import Spec

#: gRPC port of a Triton server (HTTP 8000 and metrics 8002 beside it), as in NVIDIA's image.
TRITON_GRPC_PORT = 8001
#: Port of a rendered TGI server's Service.
TGI_PORT = 80
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")


class TritonServerKind(StrEnum):
    #: The model's Serve replica starts a Triton process on its own node (nvidia-pytriton's
    #: bundled ``tritonserver``, the local platform), health-checks it and stops it with itself.
    process = "process"
    #: rayplane renders NVIDIA's Triton container as a Deployment + Service on the model's pool
    #: (EKS); the replica connects to that Service.
    container = "container"
    #: A Triton server someone else runs, at ``url``.
    external = "external"


class TritonSpec(Spec):
    """Where the Triton server of an ``engine: triton`` model runs."""

    server: TritonServerKind = Field(default=TritonServerKind.process, description=(
        "process: the replica starts Triton itself (local platform); container: rayplane "
        "renders NVIDIA's Triton container on the model's pool (EKS); external: a server at "
        "url."))
    url: str | None = Field(default=None, description=(
        "external: the server's gRPC address, host:port."))
    model_name: str = Field(default="llm", description=(
        "The model's name in the Triton repository (the vLLM backend's interface: "
        "text_input / sampling_parameters in, text_output out)."))
    startup_timeout_s: float = Field(default=180, gt=0, le=3600, description=(
        "process: how long the replica waits for Triton to load the model."))

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$", v):
            raise ValueError("use letters, digits and _ . - (at most 64)")
        return v

    @model_validator(mode="after")
    def _url(self) -> TritonSpec:
        if self.server is TritonServerKind.external:
            if not self.url:
                raise ValueError("url: required with server 'external' (host:port of its gRPC "
                                 "endpoint)")
            if not _HOST_PORT.match(self.url):
                raise ValueError(f"url: {self.url!r} is not host:port (Triton's gRPC endpoint, "
                                 "no scheme)")
        elif self.url:
            raise ValueError(f"url: only for server 'external'; with {self.server.value!r} "
                             "rayplane knows where the server is")
        return self


class UpstreamServerKind(StrEnum):
    #: Any OpenAI-compatible server the platform does not run (a standalone vLLM, Triton's
    #: OpenAI frontend, a hosted API), at ``base_url``.
    external = "external"
    #: Hugging Face Text Generation Inference, rendered by rayplane as a Deployment + Service
    #: on the model's pool (EKS). TGI is in maintenance mode upstream (docs/serving.md).
    tgi = "tgi"


class SecretSource(Spec):
    """Where one secret is read on the Ray nodes: an environment variable or a file. Never
    the value: a config is not a secret."""

    env: str | None = Field(default=None, description="Environment variable holding it.")
    file: str | None = Field(default=None, description="File holding it (absolute path).")
    first: bool = Field(default=False, description=(
        "Take the first of several keys (comma-separated in the variable, one per line in the "
        "file), as the platform's own api_keys hold them."))

    @model_validator(mode="after")
    def _one(self) -> SecretSource:
        if bool(self.env) == bool(self.file):
            raise ValueError("name exactly one of env or file")
        if self.env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.env):
            raise ValueError(f"env: {self.env!r} is not an environment variable name")
        return self


class ModelShape(Spec):
    """The served model's architecture, the fields of its Hugging Face config.json, where a
    rendered server sizes its KV cache from it (TGI's --max-batch-total-tokens,
    raycluster/kuberay/inference_servers.py): a models:/ or s3:// source cannot be read at
    render time."""

    num_hidden_layers: int = Field(ge=1, description="config.json num_hidden_layers.")
    num_key_value_heads: int = Field(ge=1, description=(
        "config.json num_key_value_heads (num_attention_heads for a model without "
        "grouped-query attention)."))
    head_dim: int = Field(ge=1, description=(
        "config.json head_dim (hidden_size / num_attention_heads where absent)."))
    parameters_b: float = Field(gt=0, description=(
        "Parameters, in billions: the weights take parameters_b x dtype_bytes GB."))
    dtype_bytes: int = Field(default=2, ge=1, le=4, description=(
        "Bytes per weight and per KV value (2: bf16 / fp16)."))


class UpstreamSpec(Spec):
    """An OpenAI-compatible server that answers for an ``engine: openai-upstream`` model."""

    server: UpstreamServerKind = Field(default=UpstreamServerKind.external, description=(
        "external: a server at base_url; tgi: rayplane renders TGI on the model's pool (EKS) "
        "and base_url is its Service."))
    base_url: str | None = Field(default=None, description=(
        "external: the server's OpenAI base URL, e.g. http://host:8080/v1."))
    model: str | None = Field(default=None, description=(
        "The upstream's name of the model (default: the served name)."))
    api_key: SecretSource | None = Field(default=None, description=(
        "Where the upstream's own key is read (sent as its Bearer token; clients never see "
        "it)."))
    connect_timeout_s: float = Field(default=5, gt=0, le=120, description=(
        "Longest wait to connect; past it the attempt fails (and is retried)."))
    read_timeout_s: float = Field(default=60, gt=0, le=3600, description=(
        "Longest silence from the upstream, first token included; past it 504."))
    retries: int = Field(default=2, ge=0, le=5, description=(
        "Attempts after the first when the upstream cannot be reached or answers 502/503/504 "
        "before any byte of the answer; a started stream is never retried."))
    model_shape: ModelShape | None = Field(default=None, description=(
        "tgi: the model's architecture, from which rayplane sizes TGI's KV cache "
        "(--max-batch-total-tokens) on the pool's GPU unit."))

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("must be an http(s) URL, e.g. http://host:8080/v1")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _where(self) -> UpstreamSpec:
        if self.server is UpstreamServerKind.external and not self.base_url:
            raise ValueError("base_url: required with server 'external' (the upstream's "
                             "OpenAI base URL, e.g. http://host:8080/v1)")
        if self.server is UpstreamServerKind.tgi and self.base_url:
            raise ValueError("base_url: rayplane renders TGI and knows its Service; remove "
                             "base_url or set server: external")
        if self.model_shape is not None and self.server is not UpstreamServerKind.tgi:
            raise ValueError("model_shape: only for server 'tgi' (rayplane sizes the server "
                             "it renders)")
        return self


def triton_service(deployment: str) -> str:
    """Name of the rendered Triton container's Deployment and Service of a model deployment
    (``model-<name>``): the replica reaches it in its own namespace by this short name."""
    return "triton-" + deployment.removeprefix("model-")


def tgi_service(deployment: str) -> str:
    """Name of the rendered TGI Deployment and Service of a model deployment."""
    return "tgi-" + deployment.removeprefix("model-")


__all__ = ["TGI_PORT", "TRITON_GRPC_PORT", "ModelShape", "SecretSource", "TritonServerKind", "TritonSpec",
           "UpstreamServerKind", "UpstreamSpec", "tgi_service", "triton_service"]
