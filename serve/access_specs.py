"""Who may call a serve config's OpenAI endpoint: where its API keys are read (``ApiKeys``),
its tenants (``TenantSpec``, each with its own keys) and their rate limits (``RateLimits``).
Schema only, as serve/config.py (which re-exports these names); the agents app's spec uses
the same keys and checks. The keys themselves are never in a config: a config is not a secret.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from raycluster.spec import Spec


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


# A DNS label (it names the tenant's key in the API keys Secret and its volume on EKS).
_TENANT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class RateLimits(Spec):
    """Requests and tokens per minute (unset: unlimited)."""

    requests_per_minute: int | None = Field(default=None, ge=1, description=(
        "Requests per minute (every authenticated request to /v1 counts); past it 429 with "
        "Retry-After."))
    tokens_per_minute: int | None = Field(default=None, ge=1, description=(
        "Prompt + completion tokens per minute (max_tokens x n reserved at admission, the "
        "exact usage settled when the response ends); past it 429 with Retry-After."))

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None


class TenantSpec(Spec):
    """A tenant of the OpenAI endpoint: its API keys (read like ``api_keys``: named by env
    variable or file, never written here) share one budget."""

    name: str = Field(description="Tenant name (metrics label, 429 messages).")
    api_keys: ApiKeys = Field(description="Where this tenant's keys are read.")
    requests_per_minute: int | None = Field(default=None, ge=1, description=(
        "Requests per minute of all this tenant's keys together (unset: unlimited)."))
    tokens_per_minute: int | None = Field(default=None, ge=1, description=(
        "Prompt + completion tokens per minute of all its keys together (unset: "
        "unlimited)."))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TENANT_NAME.match(v):
            raise ValueError("use lowercase letters, digits and '-' (at most 40, starting "
                             "and ending with a letter or digit)")
        if v == "default":
            raise ValueError("'default' names the keys without a tenant; choose another name")
        return v


def _key_sources(keys: ApiKeys) -> list[tuple[str, str]]:
    return [(kind, value) for kind, value in (("env", keys.env), ("file", keys.file)) if value]


def check_tenants(tenants: list[TenantSpec], api_keys: ApiKeys | None) -> None:
    """Tenant names are unique and no env variable or file feeds two of them (or a tenant and
    ``api_keys``): a key belongs to one budget."""
    names: dict[str, int] = {}
    sources: dict[tuple[str, str], str] = {}
    if api_keys is not None:
        sources.update({src: f"api_keys.{src[0]}" for src in _key_sources(api_keys)})
    for i, tenant in enumerate(tenants):
        if tenant.name in names:
            raise ValueError(f"tenants[{i}].name: {tenant.name!r} is also "
                             f"tenants[{names[tenant.name]}]; tenant names must be unique")
        names[tenant.name] = i
        for src in _key_sources(tenant.api_keys):
            here = f"tenants[{i}].api_keys.{src[0]}"
            if src in sources:
                raise ValueError(f"{here}: {src[1]!r} is also {sources[src]}; a key belongs "
                                 "to one tenant, give each its own")
            sources[src] = here


def check_api_keys(api_keys: ApiKeys | None, allow_unauthenticated: bool) -> None:
    """A public endpoint has keys, unless its config says explicitly that it has none (the
    OpenAI app and the agents app alike)."""
    if api_keys is None and not allow_unauthenticated:
        raise ValueError("api_keys: required (an env variable or a file holding the keys);"
                         " set allow_unauthenticated: true to serve without keys")
    if api_keys is not None and allow_unauthenticated:
        raise ValueError("allow_unauthenticated: true contradicts api_keys; keep one")


__all__ = ["ApiKeys", "RateLimits", "TenantSpec", "check_api_keys", "check_tenants"]
