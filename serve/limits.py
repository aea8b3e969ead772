"""Per-tenant rate limits of the OpenAI endpoint: requests and tokens per minute, enforced in
the ingress replica so that one tenant over its limit is refused (429 + ``Retry-After``)
while the others keep their own budgets.

Each principal (a tenant of the serve config, or an API key without a tenant, on the config's
``default_limits``) has two token buckets: requests (one per request) and tokens (prompt +
completion tokens). A bucket holds at most a minute's worth and refills continuously, so a
tenant idle for a minute may burst its whole limit, then gets its limit per minute.

Tokens are counted after the fact, exactly (the response's ``usage``), and estimated up front
from what the request itself bounds: its ``max_tokens`` x ``n`` is reserved at admission (a
request is admitted while the bucket holds that much, or is full) and the difference to the
real count is settled when the response ends. A request without ``max_tokens`` reserves
nothing and is charged afterwards; a tenant can then overshoot by what its requests in flight
generate, and waits until the debt is repaid.

The state lives in the ingress replica (no shared store, no extra hop on the request path):
with N ingress replicas each one enforces limit / N (the serve config passes N), which is
exact in total as long as Serve spreads a tenant's requests evenly over the replicas.

Pure Python, no Ray: the ingress (serve/ingress.py) and the unit tests use it alike.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from serve.protocol import error_body

#: ``code`` of every 429 body, as OpenAI's API answers it.
RATE_LIMIT_CODE = "rate_limit_exceeded"


@dataclass(frozen=True)
class Limits:
    """A principal's limits per minute (None: unlimited)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any] | None) -> Limits:
        doc = doc or {}
        return cls(doc.get("requests_per_minute"), doc.get("tokens_per_minute"))

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None


@dataclass
class TokenBucket:
    """``capacity`` units, refilled at ``rate`` per second; ``level`` may go below zero (a
    debt: tokens counted after the fact beyond what was reserved)."""

    capacity: float
    rate: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, limit: float, now: float, floor: float = 0.0) -> TokenBucket:
        capacity = max(limit, floor)
        return cls(capacity=capacity, rate=limit / 60.0, level=capacity, updated=now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds ``amount`` (0: now)."""
        self.refill(now)
        missing = amount - self.level
        return 0.0 if missing <= 1e-9 else missing / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True)
class Refusal:
    """A request over a limit: what the 429 says."""

    kind: Literal["requests", "tokens"]
    principal: str
    limit: int  # per minute, for the whole application
    share: float  # per minute, what this replica enforces
    retry_after_s: float

    @property
    def retry_after(self) -> int:
        """``Retry-After`` in whole seconds, never 0 (a client retrying at once is refused)."""
        return max(1, math.ceil(self.retry_after_s - 1e-9))

    def message(self) -> str:
        unit = "requests per minute (RPM)" if self.kind == "requests" else \
            "tokens per minute (TPM)"
        replica = "" if self.share == self.limit else \
            f" ({self.share:g} per ingress replica)"
        return (f"Rate limit reached for {self.principal} on {unit}: limit {self.limit}"
                f"{replica}. Please try again in {self.retry_after}s.")

    def body(self) -> dict[str, Any]:
        return error_body(self.message(), self.kind, code=RATE_LIMIT_CODE)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after),
                f"x-ratelimit-limit-{self.kind}": str(self.limit),
                f"x-ratelimit-reset-{self.kind}": f"{self.retry_after}s"}


@dataclass
class _State:
    requests: TokenBucket | None
    tokens: TokenBucket | None


@dataclass
class Ticket:
    """An admitted request: what it reserved, settled by :meth:`Limiter.settle`."""

    principal: str
    reserved: int = 0
    settled: bool = field(default=False)


class Limiter:
    """The buckets of every principal this replica has seen.

    ``tenants`` maps a tenant's name to its limits; a principal that is not a tenant (an
    API key of ``api_keys`` without a tenant) gets ``default``, one budget per key.
    ``replicas``: the ingress replicas sharing the application's limits."""

    def __init__(self, tenants: Mapping[str, Limits] | None = None,
                 default: Limits | None = None, replicas: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.tenants = dict(tenants or {})
        self.default = default or Limits()
        self.replicas = max(1, int(replicas))
        self.clock = clock
        self._states: dict[str, _State] = {}

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> Limiter | None:
        """The limiter of a serve config's ``limits`` argument
        (``ServeAppConfig.limits_args``); None when nothing is limited."""
        if not args:
            return None
        tenants = {t["name"]: Limits.of(t) for t in args.get("tenants") or []}
        limiter = cls(tenants, Limits.of(args.get("default")), args.get("replicas", 1))
        return None if limiter.unlimited else limiter

    @property
    def unlimited(self) -> bool:
        return self.default.unlimited and all(lim.unlimited for lim in self.tenants.values())

    def limits_of(self, tenant: str | None) -> Limits:
        """A tenant's limits; ``default`` for a key without a tenant."""
        return self.tenants.get(tenant, self.default) if tenant else self.default

    def counts_tokens(self, tenant: str | None) -> bool:
        return self.limits_of(tenant).tokens_per_minute is not None

    def _state(self, principal: str, tenant: str | None, now: float) -> _State:
        state = self._states.get(principal)
        if state is None:
            lim = self.limits_of(tenant)
            rpm, tpm = lim.requests_per_minute, lim.tokens_per_minute
            # A replica's share of a request limit is at least one request, or a limit
            # smaller than the replica count could never admit anything.
            state = _State(
                None if rpm is None else TokenBucket.per_minute(rpm / self.replicas, now, 1.0),
                None if tpm is None else TokenBucket.per_minute(tpm / self.replicas, now))
            self._states[principal] = state
        return state

    def _refusal(self, kind: Literal["requests", "tokens"], principal: str, tenant: str | None,
                 wait: float) -> Refusal:
        lim = self.limits_of(tenant)
        limit = lim.requests_per_minute if kind == "requests" else lim.tokens_per_minute
        assert limit is not None  # only a limited bucket refuses
        return Refusal(kind, principal, limit, limit / self.replicas, wait)

    def acquire(self, principal: str, tenant: str | None = None,
                reserve: int | None = 0) -> Ticket | Refusal:
        """Admit one request of ``principal`` reserving ``reserve`` tokens (None: a request
        that generates nothing, e.g. GET /v1/models, counted against requests only), or
        refuse it, taking nothing. Both limits are checked before either is charged."""
        now = self.clock()
        state = self._state(principal, tenant, now)
        if state.requests is not None:
            wait = state.requests.wait(1.0, now)
            if wait > 0:
                return self._refusal("requests", principal, tenant, wait)
        tokens = state.tokens if reserve is not None else None
        if tokens is not None:
            need = min(max(reserve or 0, 1), tokens.capacity)
            wait = tokens.wait(need, now)
            if wait > 0:
                return self._refusal("tokens", principal, tenant, wait)
        if state.requests is not None:
            state.requests.take(1.0)
        if tokens is not None:
            tokens.take(reserve or 0)
        return Ticket(principal, (reserve or 0) if tokens is not None else 0)

    def settle(self, ticket: Ticket, used: int | None) -> None:
        """The request of ``ticket`` ended having used ``used`` tokens (prompt + completion;
        None: unknown, its reservation stands). Once per ticket."""
        if ticket.settled:
            return
        ticket.settled = True
        state = self._states.get(ticket.principal)
        if state is None or state.tokens is None or used is None:
            return
        self._adjust(state.tokens, used - ticket.reserved)

    @staticmethod
    def _adjust(bucket: TokenBucket, delta: int) -> None:
        if delta >= 0:
            bucket.take(delta)
        else:
            bucket.give(-delta)

    def remaining(self, principal: str, tenant: str | None = None) -> dict[str, float | None]:
        """What ``principal`` may still send now, in this replica (tests, debugging)."""
        now = self.clock()
        state = self._state(principal, tenant, now)
        out: dict[str, float | None] = {}
        for kind, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is not None:
                bucket.refill(now)
            out[kind] = None if bucket is None else bucket.level
        return out


def reservation(req: Any) -> int:
    """Tokens a chat or text completion request bounds itself to: its completion limit
    times its choices (times its prompts, for text completions); 0 when it sets no limit."""
    limit = getattr(req, "token_limit", None) if hasattr(req, "messages") else \
        getattr(req, "max_tokens", None)
    if not limit:
        return 0
    prompts = len(req.prompts) if hasattr(req, "prompts") else 1
    return int(limit) * int(getattr(req, "n", 1) or 1) * prompts


def usage_tokens(usage: Mapping[str, Any] | None) -> int | None:
    """prompt + completion tokens of an OpenAI ``usage`` object (None when absent)."""
    if not isinstance(usage, Mapping):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return sum(parts) if all(isinstance(p, int) for p in parts) else None  # type: ignore[arg-type]


class UsageTap:
    """Reads a stream's usage chunk (``stream_options.include_usage``, which the ingress
    turns on for a tenant whose tokens are counted) and, when the client did not ask for
    usage itself, hides it: the usage chunk is dropped and every chunk's ``"usage":null``
    removed, so the client sees the stream it asked for."""

    _NULL = ',"usage":null}'

    def __init__(self, hide: bool):
        self.hide = hide
        self.used: int | None = None

    def see(self, text: str) -> str:
        """``text`` (one or more ``data: ...`` events) as the client gets it."""
        if '"usage":' not in text:
            return text
        out = []
        for event in text.split("\n\n"):
            if not event:
                continue
            if event.startswith("data: {") and '"usage":{' in event:
                try:
                    obj = json.loads(event[len("data: "):])
                except ValueError:
                    obj = None
                used = usage_tokens(obj.get("usage")) if isinstance(obj, dict) else None
                if used is not None and not obj.get("choices"):  # type: ignore[union-attr]
                    self.used = used
                    if self.hide:
                        continue
            if self.hide and event.endswith(self._NULL):
                event = event[:-len(self._NULL)] + "}"
            out.append(event + "\n\n")
        return "".join(out)


class LimitMetrics:
    """Per-tenant series (Ray exports them with the ``ray_`` prefix): requests refused
    (``rayplane_serve_rate_limited``; tenant, limit) and tokens counted
    (``rayplane_serve_tenant_tokens``; tenant). Keys without a tenant are ``default``:
    a key never becomes a label."""

    def __init__(self):
        from ray.util import metrics

        self.refused = metrics.Counter(
            "rayplane_serve_rate_limited", description="Requests refused with 429 (rate limit).",
            tag_keys=("tenant", "limit"))
        self.tokens = metrics.Counter(
            "rayplane_serve_tenant_tokens", description="Prompt + completion tokens counted "
                                                        "against a tenant's limit.",
            tag_keys=("tenant",))

    def refusal(self, tenant: str | None, kind: str) -> None:
        self.refused.inc(1, {"tenant": tenant or "default", "limit": kind})

    def used(self, tenant: str | None, tokens: int) -> None:
        if tokens > 0:
            self.tokens.inc(tokens, {"tenant": tenant or "default"})


__all__ = ["RATE_LIMIT_CODE", "LimitMetrics", "Limiter", "Limits", "Refusal", "Ticket",
           "TokenBucket", "UsageTap", "reservation", "usage_tokens"]
