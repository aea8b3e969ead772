"""The OpenAI-compatible Ray Serve application (CPU engine).

``ingress.mode: router`` (the default): two kinds of deployment, as in ``ray.serve.llm``: one
FastAPI ingress (``OpenAIIngress``: authentication, request validation, routing by ``model``,
OpenAI error bodies) and one deployment per model (``model-<name>``: the engine and the
serving logic, on the model's pool, autoscaled on its own).

``ingress.mode: direct``: one deployment, ``model-<name>``, whose replicas are the same
``OpenAIIngress`` with the model's ``ModelServer`` inside the replica instead of behind a
handle, so a request crosses the proxy -> replica hop only.

``build_app(args)`` is the ``import_path`` target of the Serve config that
``ServeAppConfig.to_serve_config`` renders; replica counts and resources come from that
config's ``deployments`` section, not from here.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raycluster.spec import field_path
from serve.config import INGRESS_DEPLOYMENT
from serve.engines.base import EngineError, EngineOverloaded
from serve.protocol import ChatCompletionRequest, CompletionRequest, ModelList, unknown_fields

logger = logging.getLogger("ray.serve")

#: Replica failures a client may retry (the openai client retries 503 by itself).
RETRY_AFTER_S = 1


def _error(status: int, message: str, type_: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(int(max(1, retry_after)))} if retry_after else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


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


# -- the model deployment ------------------------------------------------------------------


@serve.deployment
class ModelServer:
    """One served model: downloads its folder, runs the CPU engine and the OpenAI logic."""

    def __init__(self, model: dict, mlflow_tracking_uri: str | None = None):
        from serve.engines.cpu import CPUEngine
        from serve.metrics import ModelMetrics
        from serve.model_source import fetch_model
        from serve.serving import OpenAIServing

        self.name = model["name"]
        self.stream_interval_s = float(model.get("stream_interval_ms", 50)) / 1000
        self.source = model["source"]
        self.path = fetch_model(self.source, tracking_uri=mlflow_tracking_uri)
        self._downloaded = str(self.path) != self.source
        threads = min(int(model.get("threads") or 1), os.cpu_count() or 1)
        self.engine = CPUEngine(self.path, max_num_seqs=int(model.get("max_num_seqs") or 16),
                                max_model_len=model.get("max_model_len"), num_threads=threads)
        self.serving = OpenAIServing(self.engine, self.name, root=self.source,
                                     observer=ModelMetrics(self.name),
                                     stream_interval_s=self.stream_interval_s)
        logger.info("model %s from %s ready (%s, max_model_len %d)", self.name, self.source,
                    self.path, self.engine.max_model_len)

    def card(self) -> dict:
        return self.serving.model_card().model_dump()

    def stats(self) -> dict:
        return {**self.engine.stats().__dict__, "source": self.source}

    async def chat(self, req: ChatCompletionRequest, request_id: str) -> dict:
        return await self.serving.chat(req, request_id)

    async def chat_stream(self, req: ChatCompletionRequest, request_id: str):
        async for line in self.serving.chat_stream(req, request_id):
            yield line

    async def completion(self, req: CompletionRequest, request_id: str) -> dict:
        return await self.serving.completion(req, request_id)

    async def completion_stream(self, req: CompletionRequest, request_id: str):
        async for line in self.serving.completion_stream(req, request_id):
            yield line

    def check_health(self) -> None:
        failure = self.engine.failure()
        if failure is not None:
            raise RuntimeError(failure)

    def __del__(self):
        if getattr(self, "_downloaded", False):
            shutil.rmtree(Path(self.path), ignore_errors=True)


class InReplicaModel:
    """A ``ModelServer`` living in this replica, called through the part of the
    ``DeploymentHandle`` interface the ingress uses (``options(...).remote(...)``), so both
    ingress modes share one request path."""

    def __init__(self, server: Any):
        self.server = server

    def options(self, *, method_name: str, stream: bool = False) -> _InReplicaMethod:
        return _InReplicaMethod(getattr(self.server, method_name), stream)


class _InReplicaMethod:
    def __init__(self, method, stream: bool):
        self.method, self.stream = method, stream

    def remote(self, *args):
        if self.stream:
            return _InReplicaStream(self.method(*args))
        return self._call(*args)

    async def _call(self, *args):
        result = self.method(*args)
        return await result if asyncio.iscoroutine(result) else result


class _InReplicaStream:
    """An async generator with a ``DeploymentResponseGenerator``'s ``cancel()``."""

    def __init__(self, agen):
        self.agen = agen

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.agen.__anext__()

    def cancel(self) -> None:
        # Closing the generator runs the engine's cleanup (the sequence leaves the batch).
        asyncio.get_running_loop().create_task(self.agen.aclose())


# -- API keys --------------------------------------------------------------------------------


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


# -- the ingress -------------------------------------------------------------------------------

api = FastAPI(title="rayplane OpenAI API", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, models: dict[str, Any] | None, api_keys: dict | None = None,
                 in_replica: dict | None = None, mlflow_tracking_uri: str | None = None):
        from serve.metrics import IngressMetrics

        self.local_server = None
        if in_replica is not None:  # ingress.mode direct: the model runs in this replica
            self.local_server = ModelServer.func_or_class(in_replica, mlflow_tracking_uri)
            models = {in_replica["name"]: InReplicaModel(self.local_server)}
        # name -> DeploymentHandle of its ModelServer (or the in-replica model)
        self.models: dict[str, Any] = models or {}
        self.keys = ApiKeyStore(**api_keys) if api_keys else None
        self.metrics = IngressMetrics()
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

    def _auth(self, request: Request) -> JSONResponse | None:
        if self.keys is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return _error(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                          "authentication_error", code="missing_api_key")
        if not self.keys.valid(key.strip()):
            return _error(401, "Incorrect API key provided.", "authentication_error",
                          code="invalid_api_key")
        return None

    async def _parse(self, request: Request, model_cls):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
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
        denied = self._auth(request)
        if denied is not None:
            self.metrics.record("", endpoint, 401, "invalid_api_key")
            return denied
        req, error = await self._parse(request, model_cls)
        if error is not None:
            self.metrics.record(getattr(req, "model", "") or "", endpoint, error.status_code)
            return error
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        response = await (self._stream_response(req, method, rid) if req.stream
                          else self._unary_response(req, method, rid))
        self.metrics.record(req.model, endpoint, response.status_code)
        response.headers["x-request-id"] = rid
        return response

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

    async def _unary_response(self, req, method: str, rid: str) -> Response:
        handle = self._unary[(req.model, method)]
        result, error = await self._call_with_retry(lambda: handle.remote(req, rid))
        return error if error is not None else JSONResponse(result)

    async def _stream_response(self, req, method: str, rid: str) -> Response:
        handle = self._stream[(req.model, method + "_stream")]
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
            return error
        gen = holder["gen"]

        async def body():
            finished = False
            try:
                yield first
                async for line in gen:
                    yield line
                finished = True
            except asyncio.CancelledError:
                raise
            except EngineError as err:
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as err:  # noqa: BLE001 - the stream already started: report in it
                retry = _replica_gone(err)
                logger.warning("stream %s failed: %r", rid, err)
                yield "data: " + json.dumps({"error": {
                    "message": "the replica serving this stream stopped; retry the request"
                    if retry else f"internal error: {type(err).__name__}",
                    "type": "service_unavailable" if retry else "internal_server_error",
                    "param": None, "code": "replica_unavailable" if retry else None}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    gen.cancel()  # the client went away: free the engine's slot now

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
        denied = self._auth(request)
        if denied is not None:
            return denied
        cards = await asyncio.gather(*[self._unary[(name, "card")].remote()
                                       for name in self.models])
        return JSONResponse(ModelList(data=cards).model_dump())

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str, request: Request) -> Response:
        denied = self._auth(request)
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


def build_app(args: dict) -> serve.Application:
    """The application of a serve config's ``args`` (see ``ServeAppConfig.app_args``)."""
    tracking = args.get("mlflow_tracking_uri")
    if args.get("ingress_mode") == "direct":
        (model,) = args["models"]
        return OpenAIIngress.options(name=model["deployment"]).bind(
            None, args.get("api_keys"), in_replica=model, mlflow_tracking_uri=tracking)
    models = {m["name"]: ModelServer.options(name=m["deployment"]).bind(m, tracking)
              for m in args["models"]}
    return OpenAIIngress.bind(models, args.get("api_keys"))


__all__ = ["ApiKeyStore", "EngineOverloaded", "InReplicaModel", "ModelServer", "OpenAIIngress",
           "build_app"]
