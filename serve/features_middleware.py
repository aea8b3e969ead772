"""Online features for an OpenAI app whose request path rayplane does not write itself (Ray's
vLLM ingress, serve/engines/vllm.py): ASGI middleware that rewrites the chat request's JSON
body before the ingress reads it. The CPU engine's ingress (serve/ingress.py) does the same on
its parsed request; both share serve/online_features.py (the lookup, the header, the errors).

Only ``POST .../chat/completions`` for a model with ``online_features`` is touched; anything
else, and a body that is not a JSON object (the ingress answers it), passes unchanged. It sits
inside the API-key middleware (serve/middleware.py), so an unauthenticated request never
reaches the online store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from serve.online_features import HEADER, METADATA, OnlineFeatureError, OnlineFeatures, system_index
from serve.protocol import error_body

#: A request body larger than this is passed on untouched (the ingress bounds it itself).
MAX_BODY = 16 << 20


class OnlineFeaturesMiddleware:
    """``app.add_middleware(OnlineFeaturesMiddleware, online_features=...)`` with
    ``args["online_features"]`` of the Serve config (model name -> spec)."""

    def __init__(self, app, online_features: Mapping[str, Mapping[str, Any]]):
        self.app = app
        self.online = {name: OnlineFeatures(spec) for name, spec in online_features.items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" \
                or not scope.get("path", "").endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body") or size > MAX_BODY:
                break
        body = b"".join(chunks)
        more = size > MAX_BODY  # the rest is still to be received: pass everything on
        doc = None if more else _json(body)
        online = self.online.get(doc.get("model")) if isinstance(doc, dict) \
            and isinstance(doc.get("model"), str) else None
        header = None
        if online is not None and isinstance(doc.get("messages"), list):
            try:
                found = await online.lookup(doc.get(METADATA))
            except OnlineFeatureError as err:
                await _refuse(send, err)
                return
            header = found.header
            if found.text is not None:
                messages = doc["messages"]
                roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
                messages.insert(system_index(roles), {"role": "system", "content": found.text})
                body = json.dumps(doc).encode()
                scope = {**scope, "headers": [
                    (k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                    for k, v in scope.get("headers", [])]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}

        async def send_with_header(message):
            if header is not None and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (HEADER.encode(), header.encode())]}
            await send(message)

        await self.app(scope, replay, send_with_header)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


async def _refuse(send, err: OnlineFeatureError) -> None:
    payload = json.dumps(error_body(err.message, err.type, err.param, err.code)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if err.status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


__all__ = ["MAX_BODY", "OnlineFeaturesMiddleware"]
