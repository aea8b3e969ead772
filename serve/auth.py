"""API keys of the OpenAI endpoint, shared by both serving stacks and the agents app: the CPU
engine's ingress (serve/ingress.py), the API-key middleware in front of Ray's vLLM ingress
(serve/engines/vllm.py) and the agents API (agents/server/app.py) read the same keys the same
way and refuse with the same 401 body.

A key is never kept: the store holds the SHA-256 digest of each key it accepts (and which
tenant holds it), compares a presented key's digest with every one of them in constant time
(``hmac.compare_digest``, no early exit), and names a key in logs and 429 messages only by
its tenant or ``key-<first 8 hex digits of its digest>``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.protocol import error_body

logger = logging.getLogger("ray.serve")

#: Seconds between checks of the key files' modification times (rotation without a redeploy).
RELOAD_CHECK_S = 2.0


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a tenant (its keys share one budget), or a key of ``api_keys``
    without a tenant (its own budget), named by a prefix of its digest."""

    name: str
    tenant: str | None


@dataclass(frozen=True)
class _Source:
    tenant: str | None
    env: str | None
    file: str | None


def key_id(digest: bytes) -> str:
    """How logs and messages name a key without a tenant: never the key, 32 bits of its
    SHA-256 (which say nothing about the key itself)."""
    return "key-" + digest.hex()[:8]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyStore:
    """Keys from env variables and/or files, kept as SHA-256 digests and compared in constant
    time; the files are re-read when they change (rotation without a redeploy).

    ``env``/``file``: the keys of ``api_keys`` (no tenant). ``tenants``: the serve config's
    tenants (``name``, ``api_keys: {env, file}``); a key a tenant's source holds belongs to
    that tenant even when ``api_keys`` lists it too."""

    def __init__(self, env: str | None = None, file: str | None = None,
                 tenants: Sequence[Mapping[str, Any]] = ()):
        # ${RAYPLANE_STATE_DIR}/api_key locally, a mounted Secret on EKS.
        self.env, self.file = env, os.path.expandvars(file) if file else None
        self._sources = [_Source(None, env, self.file)] if env or file else []
        for t in tenants:
            keys = t.get("api_keys") or {}
            tfile = keys.get("file")
            self._sources.append(_Source(t["name"], keys.get("env"),
                                         os.path.expandvars(tfile) if tfile else None))
        self._mtimes: dict[str, float | None] = {}
        self._checked = 0.0
        self._entries: list[tuple[bytes, str | None]] = []
        self._entries = self._load()
        if not self._entries:
            raise RuntimeError(f"no API keys found (env {env!r}, file {file!r}, tenants "
                               f"{[s.tenant for s in self._sources if s.tenant]}); refusing "
                               "to serve without keys")

    def _read(self, source: _Source) -> set[str]:
        keys: set[str] = set()
        if source.env and os.environ.get(source.env):
            keys |= {k.strip() for k in os.environ[source.env].split(",") if k.strip()}
        if source.file:
            try:
                self._mtimes[source.file] = os.stat(source.file).st_mtime
                text = Path(source.file).read_text()
            except OSError:
                self._mtimes[source.file] = None
                text = ""
            keys |= {line.strip() for line in text.splitlines()
                     if line.strip() and not line.strip().startswith("#")}
        if not keys and source.tenant:
            logger.warning("tenant %s: no API keys in env %s / file %s", source.tenant,
                           source.env, source.file)
        return keys

    def _load(self) -> list[tuple[bytes, str | None]]:
        """(digest, tenant) of every key; raises ValueError when two tenants hold one key."""
        owner: dict[bytes, str | None] = {}
        for source in self._sources:
            for key in self._read(source):
                digest = _digest(key)
                held = owner.get(digest)
                if held is not None and source.tenant is not None and held != source.tenant:
                    raise ValueError(f"tenants {held!r} and {source.tenant!r} hold the same "
                                     "API key; a key belongs to one tenant")
                if source.tenant is not None or digest not in owner:
                    owner[digest] = source.tenant  # a tenant's key is the tenant's
        return list(owner.items())

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self._mtimes or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        changed = False
        for path, seen in self._mtimes.items():
            try:
                mtime: float | None = os.stat(path).st_mtime
            except OSError:
                mtime = None
            changed |= mtime != seen
        if not changed:
            return
        try:
            entries = self._load()
        except ValueError as err:
            logger.error("API key files changed but were not applied: %s", err)
            return
        if not entries:
            logger.error("API key files changed and hold no key; keeping the previous keys")
            return
        self._entries = entries

    def identify(self, key: str) -> Principal | None:
        """The principal a key belongs to, or None for an unknown key. Every stored digest
        is compared, in constant time, whichever matches."""
        self._maybe_reload()
        digest = _digest(key)
        found: tuple[bytes, str | None] | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry[0], digest):
                found = entry
        if found is None:
            return None
        tenant = found[1]
        return Principal(tenant if tenant is not None else key_id(found[0]), tenant)

    def valid(self, key: str) -> bool:
        return self.identify(key) is not None

    @property
    def tenants(self) -> list[str]:
        return sorted({s.tenant for s in self._sources if s.tenant})


def bearer_key(authorization: str) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (None when there is none)."""
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def authorize(keys: ApiKeyStore, authorization: str) -> tuple[Principal | None, dict | None]:
    """(principal, None) when the ``Authorization`` header carries a valid bearer key, else
    (None, the OpenAI error body of the 401 to answer)."""
    key = bearer_key(authorization)
    if key is None:
        return None, error_body("Missing API key: send 'Authorization: Bearer <key>'.",
                                "authentication_error", code="missing_api_key")
    principal = keys.identify(key)
    if principal is None:
        return None, error_body("Incorrect API key provided.", "authentication_error",
                                code="invalid_api_key")
    return principal, None


def authenticate(keys: ApiKeyStore, authorization: str) -> dict | None:
    """None when the ``Authorization`` header carries a valid bearer key, else the OpenAI
    error body of the 401 to answer."""
    return authorize(keys, authorization)[1]


__all__ = ["ApiKeyStore", "Principal", "authenticate", "authorize", "bearer_key", "key_id"]
