"""The ``openai-upstream`` engine: a served model whose server is any OpenAI-compatible server
outside Ray (a standalone vLLM, TGI's Messages API, Triton's OpenAI frontend, a hosted API).

The ingress (serve/ingress.py, router mode) routes the model's name to
:class:`UpstreamModelServer`, a light deployment on the ingress pool that forwards each
request with one ``httpx.AsyncClient`` per replica:

- the upstream's own key (read on the node from the env var or file the config names, sent as
  its Bearer token; the client's key never leaves rayplane, and the upstream's is never
  logged, returned or put in an error);
- ``model`` rewritten to the upstream's name on the way in and back to the served name in
  every answer and chunk; streams are passed through event by event;
- ``connect_timeout_s`` bounds each connection attempt, ``read_timeout_s`` the longest silence
  (the first byte included): past it 504 before the answer, an error event inside a stream;
- retries (``retries``): only a failure to connect (or a connection closed before any byte of
  the answer) and a 502/503/504 answer, never once the answer started;
- every failure in the platform's OpenAI error shape, naming the upstream's host
  (:data:`ERROR_MAP` / docs/serving.md). Before the first byte it is an
  :class:`~serve.engines.base.EngineError` (the ingress answers with its status); inside a
  started stream an error event then ``[DONE]``.

Health: every outcome and a probe (``GET <base_url>/models``, at most every
:data:`PROBE_INTERVAL_S` while idle, from ``check_health``) set the upstream's status, which
``stats()`` reports (the ingress's ``/healthz``, read by ``rayplane status``). A down upstream
does NOT fail the replica's health check: Serve's only cure for an unhealthy replica is to
kill and restart it, which cannot mend a remote server; each restart would reset what the
replica knows, pass again, fail again (a flap for as long as the upstream is down), and in
between turn the fast 502/503 naming the upstream into "replicas restarting". The replica
fails its health check only when it cannot work itself (its HTTP client closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from ray import serve

from serve.engines.base import EngineError
from serve.engines.upstream_wire import (
    KeySource,
    display_url,
    error_message,
    has_text,
    retry_after_s,
    sse_data,
    why,
)
from serve.protocol import SSE_DONE, ModelCard, error_body, sse

logger = logging.getLogger("ray.serve")

ENGINE = "openai-upstream"
#: Answers retried (before any byte of the answer was passed on), as connect failures are.
RETRY_STATUSES = frozenset({502, 503, 504})
#: Seconds between two probes of an idle upstream (a request's outcome counts as one).
PROBE_INTERVAL_S = 15.0
#: First pause between two attempts (doubled each time, at most 2 s; a Retry-After up to 2 s
#: is honoured).
BACKOFF_S = 0.25
#: status -> (OpenAI error type, code) of a failure of the upstream itself.
ERROR_MAP = {502: ("upstream_error", "upstream_error"),
             503: ("service_unavailable", "upstream_unavailable"),
             504: ("timeout_error", "upstream_timeout")}
UP, DEGRADED, DOWN, UNKNOWN = "up", "degraded", "down", "unknown"


class UpstreamProxy:
    """The forwarding logic of one upstream model, without Ray (the deployment wraps it)."""

    def __init__(self, model: dict, *, observer: Any = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        up = model["upstream"]
        self.name = model["name"]
        self.source = model.get("source")
        self.base_url = str(up["base_url"]).rstrip("/")
        self.url = display_url(self.base_url)
        where = urlsplit(self.base_url)  # the host (and port) errors name: never credentials
        self.host = (where.hostname or "?") + (f":{where.port}" if where.port else "")
        self.upstream_model = up.get("model") or self.name
        self.key = KeySource(up.get("api_key"))
        self.key.get()  # a missing key fails the replica's start, naming where it looked
        self.connect_timeout_s = float(up.get("connect_timeout_s", 5))
        self.read_timeout_s = float(up.get("read_timeout_s", 60))
        self.retries = int(up.get("retries", 2))
        self.observer = observer
        most = max(16, 2 * int(model.get("max_num_seqs") or 16))
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s,
                                  pool=self.read_timeout_s),
            limits=httpx.Limits(max_connections=most, max_keepalive_connections=most),
            transport=transport, follow_redirects=False)
        self.counts = {"requests": 0, "failures": 0, "retries": 0, "running": 0, "probes": 0}
        self.health: dict[str, Any] = {"status": UNKNOWN, "reason": "not contacted yet",
                                       "since": time.time(), "last_ok": None,
                                       "last_error": None}
        self._seen = 0.0  # monotonic time of the last outcome or probe

    # -- health ----------------------------------------------------------------------------

    def _observe(self, status: str, reason: str) -> None:
        self._seen = time.monotonic()
        h = self.health
        if status != h["status"]:
            h["since"] = time.time()
            logger.log(logging.INFO if status == UP else logging.WARNING,
                       "upstream %s of model %s is %s: %s", self.url, self.name, status, reason)
        h["status"], h["reason"] = status, reason
        if status == UP:
            h["last_ok"] = time.time()
        else:
            h["last_error"] = {"at": time.time(), "reason": reason}

    async def probe(self) -> None:
        """``GET <base_url>/models``: reachable and answering is up (any status but those
        below: servers answer /models differently); 401/403, 502-504 or no answer is down."""
        self.counts["probes"] += 1
        try:
            resp = await self.client.get(f"{self.base_url}/models", headers=self._headers(""),
                                         timeout=httpx.Timeout(min(self.read_timeout_s, 10.0),
                                                               connect=self.connect_timeout_s))
        except ValueError as err:
            self._observe(DOWN, str(err))
            return
        except httpx.TimeoutException:
            self._observe(DEGRADED, f"{self.host} did not answer GET /models in time")
            return
        except httpx.HTTPError as err:
            self._observe(DOWN, f"cannot reach {self.host}: {why(err)}")
            return
        code = resp.status_code
        if code in (401, 403):
            self._observe(DOWN, f"{self.host} refuses rayplane's key for it (HTTP {code})")
        elif code in RETRY_STATUSES:
            self._observe(DOWN, f"{self.host} answers HTTP {code}")
        else:
            self._observe(UP, f"{self.host} answers (GET /models: HTTP {code})")

    async def check_health(self) -> None:
        """Probe an upstream not heard from lately; fail only when this replica cannot work
        (see the module's docstring: a down upstream is reported, not restarted)."""
        if self.client.is_closed:
            raise RuntimeError("the upstream proxy's HTTP client is closed")
        if time.monotonic() - self._seen >= PROBE_INTERVAL_S:
            await self.probe()

    def stats(self) -> dict:
        """Counters and the upstream's health (the ingress's ``/healthz``); never raises."""
        try:
            return {"engine": ENGINE, "source": self.source, **self.counts,
                    "upstream": {"url": self.url, "model": self.upstream_model,
                                 **self.health}}
        except Exception as err:  # noqa: BLE001 - stats must not fail /healthz
            return {"engine": ENGINE, "stats_error": type(err).__name__}

    def card(self) -> dict:
        """The model card of ``GET /v1/models``, with the engine and the upstream it names."""
        return {**ModelCard(id=self.name, root=self.source).model_dump(), "engine": ENGINE,
                "upstream": {"url": self.url, "model": self.upstream_model}}

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- forwarding ------------------------------------------------------------------------

    def _error(self, status: int, message: str, code: str | None = None,
               retry_after: float | None = None) -> EngineError:
        type_, default = ERROR_MAP.get(status, ("invalid_request_error", None))
        return EngineError(f"upstream {self.host}: {message}", status=status, type=type_,
                           code=code or default, retry_after=retry_after)

    def _headers(self, request_id: str) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "User-Agent": "rayplane"}
        key = self.key.get()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if request_id:
            headers["X-Request-Id"] = request_id
        return headers

    def _body(self, req: Any, stream: bool) -> dict:
        body = req.model_dump(mode="json", exclude_unset=True) \
            if hasattr(req, "model_dump") else dict(req)
        body["model"] = self.upstream_model
        body["stream"] = stream
        if not stream:
            body.pop("stream_options", None)
        return body

    def _answer_error(self, code: int, raw: bytes, retry_after: float | None) -> EngineError:
        """What the client gets for an upstream's error answer (``ERROR_MAP``, docs)."""
        text = error_message(raw) or f"HTTP {code}"
        if code in (401, 403):
            return self._error(502, f"refuses rayplane's key for it (HTTP {code})",
                               "upstream_auth_failed")
        if code == 404:
            return self._error(502, f"HTTP 404 (does it serve model {self.upstream_model!r} "
                               f"at {self.url}?): {text}", "upstream_not_found")
        if code == 429:
            return EngineError(f"upstream {self.host} is rate limiting: {text}", status=429,
                               type="rate_limit_error", code="upstream_rate_limited",
                               retry_after=retry_after or 1.0)
        if code in RETRY_STATUSES:
            return self._error(code, f"answered HTTP {code}: {text}",
                               retry_after=retry_after if code == 503 else None)
        if 400 <= code < 500:  # the request itself, as the upstream judged it
            return EngineError(f"upstream {self.host} refused the request (HTTP {code}): {text}",
                               status=400, code="upstream_rejected")
        return self._error(502, f"answered HTTP {code}: {text}")

    async def _pause(self, attempt: int, retry_after: float | None) -> None:
        self.counts["retries"] += 1
        await asyncio.sleep(min(2.0, retry_after if retry_after is not None
                                else BACKOFF_S * 2 ** attempt))

    async def _open(self, path: str, body: dict, request_id: str) -> httpx.Response:
        """The upstream's 200 answer, its headers read and its body not (retried before any
        byte as the module says), or the :class:`EngineError` the client gets."""
        try:
            headers = self._headers(request_id)
        except ValueError as err:
            raise EngineError(str(err), status=500, type="internal_server_error",
                              code="upstream_key_missing") from None
        url = f"{self.base_url}{path}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = await self.client.send(self.client.build_request(
                    "POST", url, json=body, headers=headers), stream=True)
            except httpx.PoolTimeout:
                raise EngineError(f"upstream {self.host}: every connection is busy", status=503,
                                  type="service_unavailable", code="overloaded",
                                  retry_after=1.0) from None
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as err:
                reason = f"cannot connect to {self.host}: {why(err)}"
                self._observe(DOWN, reason)
                if not last:
                    await self._pause(attempt, None)
                    continue
                raise self._error(502, f"cannot connect ({why(err)}; {attempt + 1} "
                                  f"attempt{'s' if attempt else ''})",
                                  "upstream_unreachable") from None
            except httpx.TimeoutException:
                self._observe(DEGRADED, f"{self.host} sent nothing for {self.read_timeout_s:g}s")
                raise self._error(504, f"sent nothing for {self.read_timeout_s:g}s "
                                  "(read_timeout_s)") from None
            except httpx.HTTPError as err:
                self._observe(DOWN, f"{self.host}: {why(err)}")
                raise self._error(502, why(err)) from None
            if resp.status_code == 200:
                self._observe(UP, f"{self.host} answered")
                return resp
            try:
                raw = await resp.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await resp.aclose()
            retry_after = retry_after_s(resp.headers.get("retry-after"))
            if resp.status_code in RETRY_STATUSES:
                self._observe(DOWN, f"{self.host} answers HTTP {resp.status_code}")
                if not last:
                    await self._pause(attempt, retry_after)
                    continue
            elif resp.status_code in (401, 403):
                self._observe(DOWN, f"{self.host} refuses rayplane's key for it")
            else:
                self._observe(UP, f"{self.host} answered")
            raise self._answer_error(resp.status_code, raw, retry_after)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _unary(self, path: str, req: Any, request_id: str) -> dict:
        self.counts["requests"] += 1
        self.counts["running"] += 1
        start = time.perf_counter()
        try:
            resp = await self._open(path, self._body(req, stream=False), request_id)
            try:
                raw = await resp.aread()
            except httpx.TimeoutException:
                raise self._error(504, f"sent nothing for {self.read_timeout_s:g}s "
                                  "(read_timeout_s)") from None
            except httpx.HTTPError as err:
                raise self._error(502, f"the answer broke off ({why(err)})") from None
            finally:
                await resp.aclose()
            try:
                out = json.loads(raw)
            except ValueError:
                out = None
            if not isinstance(out, dict):
                raise self._error(502, "answered something that is not a JSON object")
            out["model"] = self.name
            usage = out.get("usage") or {}
            if self.observer is not None and isinstance(usage, dict):
                self.observer.finished(int(usage.get("prompt_tokens") or 0),
                                       int(usage.get("completion_tokens") or 0),
                                       time.perf_counter() - start, None)
            return out
        except BaseException:
            self.counts["failures"] += 1
            raise
        finally:
            self.counts["running"] -= 1

    async def _stream(self, path: str, req: Any, request_id: str) -> AsyncIterator[str]:
        """The upstream's events, ``model`` rewritten; refused before the first event with an
        EngineError, a failure after it as an error event and ``[DONE]``. A client that asked
        for usage gets OpenAI's usage-only last chunk when the upstream put its usage on
        another chunk (or ignored ``stream_options``)."""
        include_usage = bool(getattr(req, "include_usage", False))
        self.counts["requests"] += 1
        self.counts["running"] += 1
        start = time.perf_counter()
        try:
            resp = await self._open(path, self._body(req, stream=True), request_id)
        except BaseException:
            self.counts["failures"] += 1
            self.counts["running"] -= 1
            raise
        ended, failed, finished, first, last, usage = False, False, False, None, None, None
        usage_chunk, head = False, {}
        try:
            async for data in sse_data(resp.aiter_lines()):
                if data == "[DONE]":
                    ended = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    failed = True
                    yield sse(error_body(f"upstream {self.host} sent an event that is not a "
                                         "JSON object", *ERROR_MAP[502]))
                    break
                if "error" in obj or obj.get("object") == "error":
                    failed = True
                    err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
                    yield sse(error_body(f"upstream {self.host}: {error_message(data.encode())}",
                                         err.get("type") or ERROR_MAP[502][0],
                                         err.get("param"), err.get("code") or "upstream_error"))
                    break
                obj["model"] = self.name
                now = time.perf_counter()
                if self.observer is not None and has_text(obj):
                    if first is None:
                        first = now - start
                        self.observer.first_token(first)
                    elif last is not None:
                        self.observer.inter_token(now - last)
                    last = now
                finished = finished or any(c.get("finish_reason") for c in obj.get("choices")
                                           or [] if isinstance(c, dict))
                usage = obj.get("usage") or usage
                usage_chunk = usage_chunk or (not obj.get("choices") and bool(obj.get("usage")))
                head = {k: obj.get(k) for k in ("id", "object", "created")}
                yield sse(obj)
            else:  # the body ended cleanly without [DONE] (some servers never send it)
                ended = finished
                if not finished:
                    failed = True
                    yield sse(error_body(f"upstream {self.host} ended the stream before its "
                                         "last chunk", *ERROR_MAP[502]))
        except httpx.TimeoutException:
            failed = True
            self._observe(DEGRADED, f"{self.host} went silent mid-stream")
            yield sse(error_body(f"upstream {self.host} sent nothing for "
                                 f"{self.read_timeout_s:g}s (read_timeout_s)", *ERROR_MAP[504]))
        except httpx.HTTPError as err:
            failed = True
            self._observe(DOWN, f"{self.host} broke a stream off: {why(err)}")
            yield sse(error_body(f"upstream {self.host} broke the stream off ({why(err)})",
                                 *ERROR_MAP[502]))
        finally:
            await resp.aclose()
            self.counts["running"] -= 1
            if failed:  # (a client that went away is no failure of the upstream)
                self.counts["failures"] += 1
        if ended and isinstance(usage, dict):
            if include_usage and not usage_chunk:
                yield sse({**head, "model": self.name, "choices": [], "usage": usage})
            if self.observer is not None:
                self.observer.finished(int(usage.get("prompt_tokens") or 0),
                                       int(usage.get("completion_tokens") or 0),
                                       time.perf_counter() - start, first)
        yield SSE_DONE

    def chat(self, req: Any, request_id: str = ""):
        return self._unary("/chat/completions", req, request_id)

    def chat_stream(self, req: Any, request_id: str = "") -> AsyncIterator[str]:
        return self._stream("/chat/completions", req, request_id)

    def completion(self, req: Any, request_id: str = ""):
        return self._unary("/completions", req, request_id)

    def completion_stream(self, req: Any, request_id: str = "") -> AsyncIterator[str]:
        return self._stream("/completions", req, request_id)


@serve.deployment
class UpstreamModelServer:
    """One ``openai-upstream`` model: :class:`UpstreamProxy` with the platform's per-model
    metrics (the same series as a CPU model's)."""

    def __init__(self, model: dict, mlflow_tracking_uri: str | None = None):
        from serve.metrics import ModelMetrics

        self.metrics = ModelMetrics(model["name"], model.get("source"))
        self.proxy = UpstreamProxy(model, observer=self.metrics)
        logger.info("model %s proxies %s (model %s)", self.proxy.name, self.proxy.url,
                    self.proxy.upstream_model)

    def card(self) -> dict:
        return self.proxy.card()

    def stats(self) -> dict:
        return self.proxy.stats()

    async def chat(self, req: Any, request_id: str) -> dict:
        return await self.metrics.call(self.proxy.chat(req, request_id))

    async def chat_stream(self, req: Any, request_id: str):
        async for line in self.metrics.stream(self.proxy.chat_stream(req, request_id)):
            yield line

    async def completion(self, req: Any, request_id: str) -> dict:
        return await self.metrics.call(self.proxy.completion(req, request_id))

    async def completion_stream(self, req: Any, request_id: str):
        async for line in self.metrics.stream(self.proxy.completion_stream(req, request_id)):
            yield line

    async def check_health(self) -> None:
        await self.proxy.check_health()


__all__ = ["ENGINE", "ERROR_MAP", "PROBE_INTERVAL_S", "RETRY_STATUSES", "KeySource",
           "UpstreamModelServer", "UpstreamProxy", "display_url"]
