"""API keys and tenant limits as ASGI middleware, for an OpenAI app whose request path
rayplane does not write itself: Ray's vLLM ingress (serve/engines/vllm.py). The CPU engine's
ingress (serve/ingress.py) does the same on its parsed requests; both share serve/auth.py
(keys as digests, tenants) and serve/limits.py (buckets, the 429, the usage tap).

On ``/v1``: a request without a valid key gets the 401; with one, its principal's limits are
checked (requests for every route, tokens for ``POST .../completions``: ``max_tokens`` x
``n`` reserved from the JSON body), and the response's usage is counted when it ends (the
JSON body's ``usage``; a stream's usage chunk, asked for by rewriting the request's
``stream_options`` and hidden from a client that did not ask).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from serve.auth import ApiKeyStore, authorize
from serve.limits import Limiter, Refusal, UsageTap, usage_tokens

#: A JSON response body larger than this is passed on without reading its usage.
MAX_METERED_BODY = 8 << 20


def body_reservation(path: str, doc: Any) -> int:
    """``max_tokens`` x ``n`` (x prompts for text completions) of a raw request body, as
    serve.limits.reservation does for parsed ones; 0 when the body bounds nothing."""
    if not isinstance(doc, Mapping):
        return 0
    chat = path.endswith("/chat/completions")
    limit = (doc.get("max_completion_tokens") or doc.get("max_tokens")) if chat else \
        doc.get("max_tokens", 16)
    n = doc.get("n") or 1
    prompt = doc.get("prompt")
    prompts = len(prompt) if not chat and isinstance(prompt, list) and prompt \
        and not isinstance(prompt[0], int) else 1
    if not isinstance(limit, int) or not isinstance(n, int) or limit < 1 or n < 1:
        return 0
    return limit * n * prompts


class _Meter:
    """The usage of a response as it passes: a JSON body's, or a stream's usage chunk."""

    def __init__(self, tap: UsageTap | None):
        self.tap = tap
        self.body = bytearray()
        self.pending = ""

    def feed(self, chunk: bytes, more: bool) -> bytes:
        if self.tap is None:
            if len(self.body) <= MAX_METERED_BODY:
                self.body += chunk
            return chunk
        self.pending += chunk.decode("utf-8", errors="replace")
        head, sep, self.pending = self.pending.rpartition("\n\n")
        out = self.tap.see(head + sep) if sep else ""
        if not more and self.pending:
            out, self.pending = out + self.tap.see(self.pending), ""
        return out.encode()

    def used(self) -> int | None:
        if self.tap is not None:
            return self.tap.used
        try:
            doc = json.loads(bytes(self.body))
        except (ValueError, RecursionError):
            return None
        return usage_tokens(doc.get("usage")) if isinstance(doc, dict) else None


class TenantMiddleware:
    """``app.add_middleware(TenantMiddleware, api_keys=..., limits=...)``: ``api_keys`` and
    ``limits`` as the serve config renders them (``args["api_keys"]``, ``args["limits"]``).
    Built in the replica on its first request, where the key files are."""

    def __init__(self, app, api_keys: Mapping[str, Any] | None = None,
                 limits: Mapping[str, Any] | None = None, prefix: str = "/v1"):
        self.app, self.prefix = app, prefix
        self.keys = ApiKeyStore(**(api_keys or {}), tenants=(limits or {}).get("tenants") or [])
        self.limiter = Limiter.from_args(limits)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        principal, denied = authorize(self.keys, Headers(scope=scope).get("authorization", ""))
        if denied is not None or self.limiter is None:
            app = JSONResponse(denied, status_code=401) if denied is not None else self.app
            await app(scope, receive, send)
            return
        generating = scope["method"] == "POST" and scope["path"].endswith("/completions")
        doc, body = None, b""
        if generating:
            body = await _read_body(receive)
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):  # the app behind answers the 400
                doc = None
        reserve = body_reservation(scope["path"], doc) if generating else None
        ticket = self.limiter.acquire(principal.name, principal.tenant, reserve)
        if isinstance(ticket, Refusal):
            await JSONResponse(ticket.body(), status_code=429,
                               headers=ticket.headers())(scope, receive, send)
            return
        tap = None
        if isinstance(doc, dict) and doc.get("stream") is True:
            options = doc.get("stream_options")
            options = options if isinstance(options, dict) else {}
            tap = UsageTap(hide=not options.get("include_usage"))
            doc["stream_options"] = {**options, "include_usage": True}
            body = json.dumps(doc).encode()
            scope = {**scope, "headers": [
                *[(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"],
                (b"content-length", str(len(body)).encode())]}
        meter, status = _Meter(tap), {"code": 0}

        async def metered_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if tap is not None and tap.hide:  # the body changes length
                    message = {**message, "headers": [
                        (k, v) for k, v in message.get("headers", [])
                        if k.lower() != b"content-length"]}
            elif message["type"] == "http.response.body" and status["code"] == 200:
                more = message.get("more_body", False)
                message = {**message, "body": meter.feed(message.get("body", b""), more)}
            await send(message)

        try:
            await self.app(scope, _replay(body, receive) if generating else receive,
                           metered_send)
        finally:
            self.limiter.settle(ticket, meter.used() if status["code"] == 200 else 0)


async def _read_body(receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return bytes(body)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect when the client goes
    return replayed


__all__ = ["MAX_METERED_BODY", "TenantMiddleware", "body_reservation"]
