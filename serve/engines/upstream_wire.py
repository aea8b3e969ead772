"""The wire details of the ``openai-upstream`` engine (serve/engines/upstream.py): the
upstream's key, what of its URL may be shown, its error bodies and its server-sent events.

No Ray, no serving logic: pure helpers the proxy and its tests use.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

#: An upstream's error message is cut to this many characters.
_MESSAGE_CHARS = 300


def display_url(url: str) -> str:
    """``url`` without what must not be shown (user info, query, fragment)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


class KeySource:
    """The upstream's key, read on the node from an env var or a file (re-read when the file
    changes: a rotated Kubernetes Secret mount). The value is never logged or shown."""

    def __init__(self, source: dict | None):
        self.env = (source or {}).get("env")
        self.file = (source or {}).get("file")
        # The first of several keys (the platform's own api_keys, a mixed config's vLLM app).
        self.first = bool((source or {}).get("first"))
        self._cached: tuple[int, str] | None = None

    @property
    def where(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def get(self) -> str | None:
        """The key, None when no key is configured; ValueError naming where it was looked for
        when it is configured but missing."""
        if not self.env and not self.file:
            return None
        if self.env:
            value = os.environ.get(self.env, "").strip()
        else:
            try:
                mtime = Path(self.file).stat().st_mtime_ns
                if self._cached is None or self._cached[0] != mtime:
                    self._cached = (mtime, Path(self.file).read_text().strip())
                value = self._cached[1]
            except OSError as err:
                raise ValueError(f"the upstream's key: cannot read {self.where} "
                                 f"({type(err).__name__})") from None
        if self.first and value:  # as serve/auth.py reads them: comma-separated or lines
            keys = [k.strip() for k in value.replace(",", "\n").splitlines()
                    if k.strip() and not k.strip().startswith("#")]
            value = keys[0] if keys else ""
        if not value:
            raise ValueError(f"the upstream's key: {self.where} is unset or empty on this node")
        return value


def error_message(raw: bytes) -> str:
    """The message of an upstream's error body (OpenAI's, FastAPI's ``detail``, vLLM's and
    TGI's flat ``message`` / ``error``), or its text, cut short."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:_MESSAGE_CHARS]
    if isinstance(obj, dict):
        err = obj.get("error")
        for found in ((err or {}).get("message") if isinstance(err, dict) else err,
                      obj.get("message"), obj.get("detail")):
            if found:
                return (found if isinstance(found, str) else json.dumps(found))[:_MESSAGE_CHARS]
    return text[:_MESSAGE_CHARS]


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined; comments, ``event:``
    and ``id:`` fields dropped)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def has_text(obj: dict) -> bool:
    for c in obj.get("choices") or []:
        if isinstance(c, dict) and (c.get("text") or (c.get("delta") or {}).get("content")):
            return True
    return False


def retry_after_s(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def why(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text or type(err).__name__)[:200]


__all__ = ["KeySource", "display_url", "error_message", "has_text", "retry_after_s",
           "sse_data", "why"]
