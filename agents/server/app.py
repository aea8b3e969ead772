"""The agents Serve application: the graphs behind the LangGraph server API, so LangGraph's
own ``langgraph-sdk`` client (``get_client(url=..., api_key=...)``) drives it unchanged.

Routes (paths, bodies and answers as LangGraph's server has them):

    GET  /ok, /info                                      health, server facts (no key)
    POST /assistants/search, /assistants/count           the hosted graphs, one assistant each
    GET  /assistants/{id}[/graph|/schemas]               {id}: the assistant's uuid or graph id
    POST /threads, /threads/search, /threads/count
    GET|PATCH|DELETE /threads/{id}
    GET  /threads/{id}/state[/{checkpoint_id}]   POST /threads/{id}/state (update)
    POST /threads/{id}/history
    POST /threads/{id}/runs[/wait|/stream]   POST /runs/wait, /runs/stream (stateless)
    GET  /threads/{id}/runs[/{run_id}[/join]]    POST .../{run_id}/cancel   DELETE .../{run_id}

Every error is ``serve.protocol.error_body``'s shape (agents/server/errors.py). The key comes
as ``x-api-key`` (what the SDK sends) or ``Authorization: Bearer``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from agents.server.encoding import sse_event
from agents.server.errors import ApiError, from_exception, validation_error
from agents.server.models import (
    MAX_OFFSET,
    AssistantSearch,
    History,
    RunCreate,
    StateUpdate,
    ThreadCreate,
    ThreadPatch,
    ThreadSearch,
)
from agents.server.openapi import (
    ERROR_RESPONSES,
    Assistant,
    CheckpointRef,
    GraphSchemas,
    Run,
    Thread,
    ThreadState,
    answers,
    document_openapi,
    stream_ok,
)
from agents.server.service import Service
from agents.spec import AgentsAppConfig
from raycluster.catalog import POOL_RESOURCE_PREFIX
from serve.auth import ApiKeyStore

DEPLOYMENT = "AgentsApi"
IMPORT_PATH = "agents.server.app:build_agents_app"
#: A thread, run or checkpoint id in a path: any text PostgreSQL can store (no NUL).
Ident = Annotated[str, Path(pattern="^[^\x00]+$")]
RunStatus = Literal["pending", "running", "success", "error", "timeout", "interrupted"]



def run_location(thread_id: str | None, run_id: str) -> str:
    """A run's path for ``Content-Location``, percent-encoded: HTTP headers are Latin-1, and a
    thread id is whatever the client chose (schemathesis sent one in Unicode: a 500)."""
    return f"/threads/{quote(str(thread_id), safe='')}/runs/{quote(str(run_id), safe='')}"

def _error(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def key_check(keys: ApiKeyStore | None):
    """The dependency refusing a request without a valid key (401)."""
    async def check(request: Request) -> None:
        if keys is None:
            return
        key = request.headers.get("x-api-key", "").strip()
        if not key:
            scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
            key = bearer.strip() if scheme.lower() == "bearer" else ""
        if not key:
            raise ApiError(401, "Missing API key: send 'x-api-key: <key>' (langgraph-sdk's "
                                "api_key) or 'Authorization: Bearer <key>'.",
                           "authentication_error", code="missing_api_key")
        if not keys.valid(key):
            raise ApiError(401, "Incorrect API key provided.", "authentication_error",
                           code="invalid_api_key")
    return check


def recovering_route(service: Service) -> type[APIRoute]:
    """Routes that, when PostgreSQL was unreachable, try once more if it answers again
    (``Service.recover``): the first request after the database is back succeeds."""
    import psycopg
    from psycopg_pool import PoolTimeout

    class Route(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                generation = service.generation
                try:
                    return await handler(request)
                except (PoolTimeout, psycopg.OperationalError):
                    if not await service.recover(generation):
                        raise
                return await handler(request)  # the body is cached by the first attempt
            return handle
    return Route


def create_app(service: Service, keys: ApiKeyStore | None) -> FastAPI:
    """The FastAPI app of one replica."""
    app = FastAPI(title="rayplane agents", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")

    @app.exception_handler(ApiError)
    async def _api(_request: Request, err: ApiError) -> JSONResponse:
        return _error(err, {"www-authenticate": "Bearer"} if err.status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(validation_error(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(ApiError(err.status_code, str(err.detail), kind))

    @app.exception_handler(Exception)
    async def _other(_request: Request, err: Exception) -> JSONResponse:
        return _error(from_exception(err))

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {"version": "rayplane", "flags": {"assistants": True, "crons": False,
                                                 "langsmith": False}}

    api = APIRouter(dependencies=[Depends(key_check(keys))],
                    route_class=recovering_route(service), responses=ERROR_RESPONSES)
    reg = service.registry

    @api.post("/assistants/search", response_model=None, responses=answers(list[Assistant]))
    async def search_assistants(body: AssistantSearch, response: Response) -> list[dict]:
        found = reg.search(graph_id=body.graph_id, name=body.name, metadata=body.metadata)
        page = found[body.offset:body.offset + body.limit]
        if body.offset + body.limit < len(found):
            response.headers["X-Pagination-Next"] = str(body.offset + body.limit)
        return [a.record() for a in page]

    @api.post("/assistants/count", response_model=None, responses=answers(int))
    async def count_assistants(body: AssistantSearch) -> int:
        return len(reg.search(graph_id=body.graph_id, name=body.name, metadata=body.metadata))

    @api.get("/assistants/{assistant_id}", response_model=None, responses=answers(Assistant))
    async def get_assistant(assistant_id: str) -> dict:
        return reg.find(assistant_id).record()

    @api.get("/assistants/{assistant_id}/graph", response_model=None,
             responses=answers(dict[str, Any]))
    async def assistant_graph(assistant_id: str, xray: bool = False) -> dict:
        graph_id = reg.find(assistant_id).graph_id
        await service.ready()
        return reg.graph(graph_id).get_graph(xray=xray).to_json()

    @api.get("/assistants/{assistant_id}/schemas", response_model=None,
             responses=answers(GraphSchemas))
    async def assistant_schemas(assistant_id: str) -> dict:
        graph_id = reg.find(assistant_id).graph_id
        await service.ready()
        graph = reg.graph(graph_id)
        return {"graph_id": graph_id, "input_schema": graph.get_input_jsonschema(),
                "output_schema": graph.get_output_jsonschema(),
                "state_schema": graph.get_output_jsonschema(),
                "config_schema": None, "context_schema": None}

    @api.post("/threads", response_model=None, responses=answers(Thread))
    async def create_thread(body: ThreadCreate) -> dict:
        import uuid

        runner = await service.ready()
        return await runner.store.create_thread(body.thread_id or str(uuid.uuid4()),
                                                body.metadata, if_exists=body.if_exists)

    @api.post("/threads/search", response_model=None, responses=answers(list[Thread]))
    async def search_threads(body: ThreadSearch) -> list[dict]:
        runner = await service.ready()
        return await runner.store.search_threads(metadata=body.metadata, status=body.status,
                                                 ids=body.ids, limit=body.limit,
                                                 offset=body.offset)

    @api.post("/threads/count", response_model=None, responses=answers(int))
    async def count_threads(body: ThreadSearch) -> int:
        runner = await service.ready()
        return len(await runner.store.search_threads(metadata=body.metadata,
                                                     status=body.status, ids=body.ids,
                                                     limit=100000, offset=0))

    @api.get("/threads/{thread_id}", response_model=None, responses=answers(Thread))
    async def get_thread(thread_id: Ident) -> dict:
        return await service.thread(thread_id)

    @api.patch("/threads/{thread_id}", response_model=None, responses=answers(Thread))
    async def patch_thread(thread_id: Ident, body: ThreadPatch) -> dict:
        runner = await service.ready()
        return await runner.store.update_thread(thread_id, metadata=body.metadata)

    @api.delete("/threads/{thread_id}", status_code=204)
    async def delete_thread(thread_id: Ident) -> Response:
        await service.delete_thread(thread_id)
        return Response(status_code=204)

    @api.get("/threads/{thread_id}/state", response_model=None, responses=answers(ThreadState))
    async def get_state(thread_id: Ident) -> dict:
        return await service.state(thread_id)

    @api.get("/threads/{thread_id}/state/{checkpoint_id}", response_model=None,
             responses=answers(ThreadState))
    async def get_state_at(thread_id: Ident, checkpoint_id: Ident) -> dict:
        return await service.state(thread_id, checkpoint_id)

    @api.post("/threads/{thread_id}/state", response_model=None, responses=answers(CheckpointRef))
    async def update_state(thread_id: Ident, body: StateUpdate) -> dict:
        return await service.update_state(thread_id, body)

    @api.post("/threads/{thread_id}/history", response_model=None,
              responses=answers(list[ThreadState]))
    async def history(thread_id: Ident, body: History) -> list[dict]:
        return await service.history(thread_id, body)

    async def _wait(thread_id: str | None, body: RunCreate) -> dict:
        ex = await service.start_run(thread_id, body, stream=False)
        return await service.runner.wait(ex)  # type: ignore[union-attr]

    async def _stream(thread_id: str | None, body: RunCreate) -> StreamingResponse:
        ex = await service.start_run(thread_id, body, stream=True)
        keep_going = (body.model_extra or {}).get("on_disconnect") == "continue"

        async def frames():
            ended = False
            try:
                async for event, data in service.runner.events(ex):  # type: ignore[union-attr]
                    yield sse_event(event, data)
                ended = True
            finally:  # a client gone mid-stream cancels the run (LangGraph's default)
                if not ended and not keep_going and ex.task is not None \
                        and not ex.task.done():
                    ex.task.cancel()

        return StreamingResponse(frames(), media_type="text/event-stream", headers={
            "Content-Location": run_location(ex.run["thread_id"], ex.run["run_id"]),
            "Cache-Control": "no-store"})

    @api.post("/threads/{thread_id}/runs/wait", response_model=None,
              responses=answers(dict[str, Any]))
    async def wait_run(thread_id: Ident, body: RunCreate) -> dict:
        return await _wait(thread_id, body)

    @api.post("/runs/wait", response_model=None, responses=answers(dict[str, Any]))
    async def wait_stateless(body: RunCreate) -> dict:
        return await _wait(None, body)

    @api.post("/threads/{thread_id}/runs/stream", response_model=None, responses=stream_ok())
    async def stream_run(thread_id: Ident, body: RunCreate) -> StreamingResponse:
        return await _stream(thread_id, body)

    @api.post("/runs/stream", response_model=None, responses=stream_ok())
    async def stream_stateless(body: RunCreate) -> StreamingResponse:
        return await _stream(None, body)

    @api.post("/threads/{thread_id}/runs", response_model=None, responses=answers(Run))
    async def create_run(thread_id: Ident, body: RunCreate, response: Response) -> dict:
        ex = await service.start_run(thread_id, body, stream=False)
        response.headers["Content-Location"] = run_location(thread_id, ex.run["run_id"])
        return ex.run

    @api.get("/threads/{thread_id}/runs", response_model=None, responses=answers(list[Run]))
    async def list_runs(thread_id: Ident, limit: Annotated[int, Query(ge=1, le=1000)] = 10,
                        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                        status: RunStatus | None = None) -> list[dict]:
        runner = await service.ready()
        return await runner.store.list_runs(thread_id, limit=limit, offset=offset,
                                            status=status)

    @api.get("/threads/{thread_id}/runs/{run_id}", response_model=None, responses=answers(Run))
    async def get_run(thread_id: Ident, run_id: Ident) -> dict:
        runner = await service.ready()
        return await runner.store.get_run(thread_id, run_id)

    @api.get("/threads/{thread_id}/runs/{run_id}/join", response_model=None,
             responses=answers(dict[str, Any]))
    async def join_run(thread_id: Ident, run_id: Ident) -> dict:
        runner = await service.ready()
        return await runner.join(thread_id, run_id)

    @api.post("/threads/{thread_id}/runs/{run_id}/cancel", response_model=None,
              responses=answers(Run))
    async def cancel_run(thread_id: Ident, run_id: Ident, wait: bool = False,
                         action: Literal["interrupt", "rollback"] = "interrupt") -> dict:
        runner = await service.ready()
        run = await runner.cancel(thread_id, run_id, action)
        if wait:
            try:
                await runner.join(thread_id, run_id)
            except ApiError:
                pass  # the run's own failure is not the cancel's
            run = await runner.store.get_run(thread_id, run_id)
        return run

    @api.delete("/threads/{thread_id}/runs/{run_id}", status_code=204)
    async def delete_run(thread_id: Ident, run_id: Ident) -> Response:
        runner = await service.ready()
        await runner.store.delete_run(thread_id, run_id)
        return Response(status_code=204)

    keyed = {(route.path, method.lower()) for route in api.routes
             for method in getattr(route, "methods", ())}
    app.include_router(api)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_openapi(generate(), keyed)
        return app.openapi_schema

    app.openapi = openapi
    return app


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64,
                  ray_actor_options={"num_cpus": 0.5,
                                     "resources": {f"{POOL_RESOURCE_PREFIX}cpu": 0.5}})
@serve.ingress()
class AgentsApi:
    """A replica of the agents API (the FastAPI app of :func:`create_app`)."""

    def __init__(self, config: dict[str, Any], handles: dict[str, Any] | None = None):
        self.config = AgentsAppConfig.model_validate(config)
        keys = self.config.api_keys
        self.keys = None if keys is None else ApiKeyStore(env=keys.env, file=keys.file)
        self.service = Service(self.config, handles)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.keys)


def deployment_options(config: AgentsAppConfig) -> dict[str, Any]:
    """The ingress's Serve options from the spec (a Serve config's own ``deployments``
    entry, as ``agents.serve_app`` renders it, overrides them): its pool's resource (cores on
    the CPU pool; one unit and no Ray CPUs on a GPU pool, the same rule), concurrency and
    autoscaling."""
    from agents.serve_app import replica_options

    return {"ray_actor_options": replica_options(config), "max_ongoing_requests": config.max_ongoing_requests,
            "autoscaling_config": config.autoscaling.serve_options()}


def build_agents_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application of ``args`` (``AgentsAppConfig.model_dump(mode="json")``):
    the API ingress, and the framework deployments of the graphs ``crewai``/``autogen``."""
    config = AgentsAppConfig.model_validate(args)
    handles: dict[str, Any] = {}
    frameworks = [g for g in config.graphs if g in ("crewai", "autogen")]
    if frameworks:
        from agents.frameworks import framework_deployment

        handles = {kind: framework_deployment(kind, config) for kind in frameworks}
    return AgentsApi.options(**deployment_options(config)).bind(
        config.model_dump(mode="json"), handles)


__all__ = ["DEPLOYMENT", "IMPORT_PATH", "AgentsApi", "build_agents_app", "create_app",
           "deployment_options", "key_check"]
