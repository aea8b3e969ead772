"""The CPU app's ingress (``OpenAIIngress``): the OpenAI routes over FastAPI, and the request
path every call takes -- API key, request validation, the tenant's rate limits (serve/limits.py:
429 + ``Retry-After``), routing by ``model``, OpenAI error bodies, and retries of a replica
that died before answering.

``ingress.mode: router`` (the default): its own deployment, which calls one deployment per
model (serve/model_server.py) through Serve handles, as in ``ray.serve.llm``.
``ingress.mode: direct``: the model's replicas are this ingress with the ``ModelServer``
inside the replica instead of behind a handle, so a request crosses the proxy -> replica hop
only.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raycluster.spec import field_path
from serve.auth import ApiKeyStore, Principal, authorize
from serve.builder import INGRESS_DEPLOYMENT
from serve.engines.base import EngineError
from serve.limits import Limiter, LimitMetrics, Refusal, Ticket, UsageTap, reservation, usage_tokens
from serve.model_server import InReplicaModel, ModelServer
from serve.online_features import HEADER as FEATURES_HEADER
from serve.online_features import METADATA, OnlineFeatureError, OnlineFeatures, system_index
from serve.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelList,
    StreamOptions,
    error_body,
    install_openapi,
    sse,
    unknown_fields,
)

logger = logging.getLogger("ray.serve")

#: Replica failures a client may retry (the openai client retries 503 by itself).
RETRY_AFTER_S = 1


def _error(status: int, message: str, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           retry_after: float | None = None) -> JSONResponse:
    """An HTTP error response with OpenAI's error body."""
    headers = {"Retry-After": str(int(max(1, retry_after)))} if retry_after else None
    return JSONResponse(error_body(message, type_, param, code), status_code=status,
                        headers=headers)


def _engine_error(err: EngineError) -> JSONResponse:
    return _error(err.status, err.message, err.type, err.param, err.code, err.retry_after)


def _replica_gone(err: BaseException) -> bool:
    """A replica died or became unreachable: the request may be retried elsewhere."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError
                      | DeploymentUnavailableError)


def _overloaded(err: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(err, BackPressureError)


api = FastAPI(title="rayplane OpenAI API", docs_url=None, redoc_url=None)
install_openapi(api)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, models: dict[str, Any] | None, api_keys: dict | None = None,
                 in_replica: dict | None = None, mlflow_tracking_uri: str | None = None,
                 limits: dict | None = None, online_features: dict | None = None):
        from serve.metrics import IngressMetrics

        self.local_server = None
        if in_replica is not None:  # ingress.mode direct: the model runs in this replica
            self.local_server = ModelServer.func_or_class(in_replica, mlflow_tracking_uri)
            models = {in_replica["name"]: InReplicaModel(self.local_server)}
        # name -> DeploymentHandle of its ModelServer (or the in-replica model)
        self.models: dict[str, Any] = models or {}
        # limits: ServeAppConfig.limits_args() -- the tenants (their keys by reference),
        # the default limits and the ingress replicas sharing them.
        tenants = (limits or {}).get("tenants") or []
        self.keys = ApiKeyStore(**(api_keys or {}), tenants=tenants) \
            if api_keys or tenants else None
        self.limiter = Limiter.from_args(limits) if self.keys is not None else None
        self.limit_metrics = LimitMetrics() if self.limiter is not None else None
        self.metrics = IngressMetrics()
        # model name -> the online features its chat requests get (serve/online_features.py)
        self.online = {name: OnlineFeatures(spec)
                       for name, spec in (online_features or {}).items()}
        self._stream = {(name, method): h.options(stream=True, method_name=method)
                        for name, h in models.items()
                        for method in ("chat_stream", "completion_stream")}
        # Handles configured once: every .options() call builds a new handle (its own
        # router and metrics pusher), which costs milliseconds on the request path.
        self._unary = {(name, method): h.options(method_name=method)
                       for name, h in models.items()
                       for method in ("chat", "completion", "card", "stats")}

    def check_health(self) -> None:
        if self.local_server is not None:
            self.local_server.check_health()

    # -- helpers -------------------------------------------------------------------------

    def _auth(self, request: Request) -> tuple[Principal | None, JSONResponse | None]:
        if self.keys is None:
            return None, None
        principal, denied = authorize(self.keys, request.headers.get("authorization", ""))
        return principal, None if denied is None else JSONResponse(denied, status_code=401)

    def _admit(self, principal: Principal | None, reserve: int | None
               ) -> tuple[Ticket | None, JSONResponse | None]:
        """The principal's limits: a ticket to settle when the response ends, or the 429."""
        if self.limiter is None or principal is None:
            return None, None
        got = self.limiter.acquire(principal.name, principal.tenant, reserve)
        if isinstance(got, Refusal):
            if self.limit_metrics is not None:
                self.limit_metrics.refusal(principal.tenant, got.kind)
            return None, JSONResponse(got.body(), status_code=429, headers=got.headers())
        return got, None

    def _settle(self, principal: Principal | None, ticket: Ticket | None,
                used: int | None) -> None:
        if self.limiter is None or ticket is None or ticket.settled:
            return
        self.limiter.settle(ticket, used)
        if self.limit_metrics is not None and principal is not None:
            self.limit_metrics.used(principal.tenant, used if used is not None
                                    else ticket.reserved)

    async def _parse(self, request: Request, model_cls):
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, a 5000-digit number
            return None, _error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return None, _error(400, "The request body must be a JSON object.")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as err:
            e = err.errors(include_url=False)[0]
            param = field_path(tuple(e["loc"]))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "missing":
                msg = "field required"
            return None, _error(400, f"{param}: {msg}", param=param.split(":")[0])
        extra = unknown_fields(req)
        if extra:
            logger.warning("request carried fields this server ignores: %s", ", ".join(extra))
        if req.model not in self.models:
            return None, _error(404, f"The model `{req.model}` does not exist. Served: "
                                     f"{', '.join(sorted(self.models))}.",
                                param="model", code="model_not_found")
        return req, None

    async def _serve(self, request: Request, model_cls, endpoint: str, method: str):
        principal, denied = self._auth(request)
        if denied is not None:
            self.metrics.record("", endpoint, 401, "invalid_api_key")
            return denied
        req, error = await self._parse(request, model_cls)
        if error is not None:
            self.metrics.record(getattr(req, "model", "") or "", endpoint, error.status_code)
            return error
        ticket, refused = self._admit(principal, reservation(req))
        if refused is not None:
            self.metrics.record(req.model, endpoint, 429, "rate_limit_exceeded")
            return refused
        attached, error = await self._attach_features(req, method)
        if error is not None:
            self._settle(principal, ticket, 0)
            self.metrics.record(req.model, endpoint, error.status_code)
            return error
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            response = await (self._stream_response(req, method, rid, principal, ticket)
                              if req.stream else
                              self._unary_response(req, method, rid, principal, ticket))
        finally:
            if not req.stream:
                self._settle(principal, ticket, 0)  # no-op once settled with the usage
        self.metrics.record(req.model, endpoint, response.status_code)
        response.headers["x-request-id"] = rid
        if attached is not None:
            response.headers[FEATURES_HEADER] = attached
        return response

    async def _attach_features(self, req, method: str
                               ) -> tuple[str | None, JSONResponse | None]:
        """The model's online features as a system message of a chat request (keyed by its
        ``metadata``): the header value saying what was attached, or the error response."""
        online = self.online.get(req.model)
        if online is None or method != "chat":
            return None, None
        try:
            found = await online.lookup((req.model_extra or {}).get(METADATA))
        except OnlineFeatureError as err:
            return None, _error(err.status, err.message, err.type, err.param, err.code,
                                RETRY_AFTER_S if err.status == 503 else None)
        if found.text is not None:
            at = system_index([m.role for m in req.messages])
            req.messages.insert(at, ChatMessage(role="system", content=found.text))
        return found.header, None

    async def _call_with_retry(self, start):
        """Run ``start()`` (a handle call up to its first result); a replica that died
        before answering is retried on another one, twice, then a retryable 503."""
        for attempt in range(3):
            try:
                return await start(), None
            except EngineError as err:
                return None, _engine_error(err)
            except Exception as err:
                if _overloaded(err):
                    return None, _error(503, "The model's queue is full; retry shortly.",
                                        "service_unavailable", code="overloaded",
                                        retry_after=RETRY_AFTER_S)
                if _replica_gone(err):
                    logger.warning("replica unavailable (attempt %d): %r", attempt + 1, err)
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                logger.exception("request failed")
                return None, _error(500, f"internal error: {type(err).__name__}",
                                    "internal_server_error")
        return None, _error(503, "The model's replicas are restarting; retry shortly.",
                            "service_unavailable", code="replica_unavailable",
                            retry_after=RETRY_AFTER_S)

    async def _unary_response(self, req, method: str, rid: str, principal: Principal | None,
                              ticket: Ticket | None) -> Response:
        handle = self._unary[(req.model, method)]
        result, error = await self._call_with_retry(lambda: handle.remote(req, rid))
        if error is not None:
            return error
        self._settle(principal, ticket, usage_tokens(result.get("usage")))
        return JSONResponse(result)

    async def _stream_response(self, req, method: str, rid: str, principal: Principal | None,
                               ticket: Ticket | None) -> Response:
        handle = self._stream[(req.model, method + "_stream")]
        tap = None
        if ticket is not None:
            # A limited principal's tokens are counted from the stream's own usage chunk; a
            # client that did not ask for it does not see it.
            tap = UsageTap(hide=not req.include_usage)
            req.stream_options = StreamOptions(include_usage=True)
        holder: dict[str, Any] = {}

        async def start():
            gen = handle.remote(req, rid)
            holder["gen"] = gen
            try:
                return await gen.__anext__()
            except BaseException:
                gen.cancel()
                raise

        first, error = await self._call_with_retry(start)
        if error is not None:
            self._settle(principal, ticket, 0)
            return error
        gen = holder["gen"]

        async def body():
            finished = False
            try:
                yield first if tap is None else tap.see(first)
                async for line in gen:
                    yield line if tap is None else tap.see(line)
                finished = True
            except asyncio.CancelledError:
                raise
            except EngineError as err:
                yield sse(err.body())
                yield SSE_DONE
            except Exception as err:  # noqa: BLE001 - the stream already started: report in it
                logger.warning("stream %s failed: %r", rid, err)
                if _replica_gone(err):
                    yield sse(error_body("the replica serving this stream stopped; retry the "
                                         "request", "service_unavailable",
                                         code="replica_unavailable"))
                else:
                    yield sse(error_body(f"internal error: {type(err).__name__}",
                                         "internal_server_error"))
                yield SSE_DONE
            finally:
                if not finished:
                    gen.cancel()  # the client went away: free the engine's slot now
                # Counted as the stream reported it; a stream cut short keeps its reservation.
                self._settle(principal, ticket, None if tap is None else tap.used)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # -- routes --------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Liveness plus each model's engine counters (no secrets; no key needed)."""
        out: dict[str, Any] = {}
        for name in self.models:
            try:
                out[name] = await asyncio.wait_for(self._unary[(name, "stats")].remote(),
                                                   timeout=5)
            except Exception as err:  # noqa: BLE001 - reported, not raised
                out[name] = {"error": type(err).__name__}
        ok = all("error" not in v for v in out.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": out},
                            status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        principal, denied = self._auth(request)
        if denied is None:
            denied = self._admit(principal, None)[1]
        if denied is not None:
            return denied
        cards = await asyncio.gather(*[self._unary[(name, "card")].remote()
                                       for name in self.models])
        return JSONResponse(ModelList(data=cards).model_dump())

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str, request: Request) -> Response:
        principal, denied = self._auth(request)
        if denied is None:
            denied = self._admit(principal, None)[1]
        if denied is not None:
            return denied
        if model not in self.models:
            return _error(404, f"The model `{model}` does not exist.", param="model",
                          code="model_not_found")
        return JSONResponse(await self._unary[(model, "card")].remote())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, "chat", "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, "completions", "completion")


__all__ = ["RETRY_AFTER_S", "OpenAIIngress", "api"]
