"""API keys of the OpenAI endpoint, shared by both serving stacks: the CPU engine's ingress
(serve/ingress.py) and the API-key middleware in front of Ray's vLLM ingress
(serve/engines/vllm.py) read the same keys the same way and refuse with the same 401 body.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path

from serve.protocol import error_body


class ApiKeyStore:
    """Keys from an env variable and/or a file, kept as SHA-256 digests and compared in
    constant time; the file is re-read when it changes (rotation without a redeploy)."""

    def __init__(self, env: str | None = None, file: str | None = None):
        # ${RAYPLANE_STATE_DIR}/api_key locally, a mounted Secret on EKS.
        self.env, self.file = env, os.path.expandvars(file) if file else None
        self._mtime: float | None = None
        self._checked = 0.0
        self._digests: set[bytes] = set()
        self._load()
        if not self._digests:
            raise RuntimeError(f"no API keys found (env {env!r}, file {file!r}); refusing to "
                               "serve without keys")

    def _load(self) -> None:
        keys: set[str] = set()
        if self.env and os.environ.get(self.env):
            keys |= {k.strip() for k in os.environ[self.env].split(",") if k.strip()}
        if self.file and os.path.isfile(self.file):
            self._mtime = os.stat(self.file).st_mtime
            for line in Path(self.file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
        self._digests = {hashlib.sha256(k.encode()).digest() for k in keys}

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self.file or now - self._checked < 2.0:
            return
        self._checked = now
        try:
            mtime = os.stat(self.file).st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            self._load()

    def valid(self, key: str) -> bool:
        self._maybe_reload()
        digest = hashlib.sha256(key.encode()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(d, digest)
        return ok


def authenticate(keys: ApiKeyStore, authorization: str) -> dict | None:
    """None when the ``Authorization`` header carries a valid bearer key, else the OpenAI
    error body of the 401 to answer."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key:
        return error_body("Missing API key: send 'Authorization: Bearer <key>'.",
                          "authentication_error", code="missing_api_key")
    if not keys.valid(key.strip()):
        return error_body("Incorrect API key provided.", "authentication_error",
                          code="invalid_api_key")
    return None


__all__ = ["ApiKeyStore", "authenticate"]
