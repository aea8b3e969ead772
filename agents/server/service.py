"""What the agents API's routes do, apart from HTTP: the replica's connection to PostgreSQL
(opened on the first request that needs it, and again after a failed attempt, so a replica
started while the database was down serves once it is back), the graphs, the runs.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from agents.server.encoding import jsonable, thread_state
from agents.server.errors import ApiError, database_down
from agents.server.graphs import Registry, tracking_uri
from agents.server.models import History, RunCreate, StateUpdate
from agents.server.runs import Execution, Runner
from agents.server.store import Store
from agents.spec import AgentsAppConfig


def _empty_state(thread_id: str) -> dict[str, Any]:
    return {"values": {}, "next": [], "checkpoint": {"thread_id": thread_id,
            "checkpoint_ns": "", "checkpoint_id": None, "checkpoint_map": None},
            "metadata": {}, "created_at": None, "parent_checkpoint": None, "tasks": [],
            "interrupts": []}


class Service:
    """One replica's agents API."""

    def __init__(self, config: AgentsAppConfig, handles: dict[str, Any] | None = None):
        self.config = config
        self.registry = Registry(config, handles)
        self._lock = asyncio.Lock()
        self.saver: Any = None
        self.store: Store | None = None
        self.runner: Runner | None = None
        self.dsn: str | None = None
        self.generation = 0  # of the connection pool; a recovery swaps in a new one
        if config.tracing:
            from agents.tracing import enable_tracing

            enable_tracing(tracking_uri(config))

    async def ready(self) -> Runner:
        """The runner, once the checkpointer, the tables and the graphs are up (503 while
        PostgreSQL cannot be reached; the next request tries again)."""
        if self.runner is not None:
            return self.runner
        async with self._lock:
            if self.runner is None:
                await self._open()
        return self.runner  # type: ignore[return-value]

    async def _open(self) -> None:
        from agents.checkpoint import aclose_checkpointer, async_postgres_checkpointer, dsn_from_env
        from raycluster.errors import PlatformError

        ck = self.config.checkpointer
        try:
            dsn = None
            if ck.dsn_env:
                import os

                dsn = os.environ.get(ck.dsn_env) or None
                if not dsn:
                    raise database_down(f"the variable {ck.dsn_env} (checkpointer.dsn_env) "
                                        "is not set on this replica")
            saver = await async_postgres_checkpointer(dsn or dsn_from_env(),
                                                      max_size=ck.pool_max_size,
                                                      timeout=ck.timeout_s)
        except PlatformError as err:
            raise database_down(str(err)) from None
        try:
            store = Store(saver.conn, ck.timeout_s)
            await store.setup()
            await self.registry.build(saver)
        except BaseException:
            await aclose_checkpointer(saver)
            raise
        self.saver, self.store, self.dsn = saver, store, dsn or dsn_from_env()
        self.runner = Runner(store, self.registry.graphs, saver)

    async def recover(self, generation: int) -> bool:
        """After a request found no pooled connection: whether PostgreSQL answers again. The
        pool retries a lost server with a growing backoff, so once the server is back it may
        still wait seconds before trying; a fresh pool takes its place at once (the
        checkpointer and the tables share it), and the request is tried again."""
        import psycopg

        from agents.checkpoint import async_postgres_checkpointer

        if self.saver is None:
            return False
        async with self._lock:
            if generation != self.generation:  # another request already recovered
                return True
            try:
                probe = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=2)
                await probe.close()
            except psycopg.Error:
                return False
            ck = self.config.checkpointer
            fresh = await async_postgres_checkpointer(self.dsn, max_size=ck.pool_max_size,
                                                      timeout=ck.timeout_s)
            old, self.saver.conn = self.saver.conn, fresh.conn
            self.store.pool = fresh.conn  # type: ignore[union-attr]
            self.generation += 1
        asyncio.get_running_loop().create_task(old.close())
        return True

    async def close(self) -> None:
        from agents.checkpoint import aclose_checkpointer

        if self.saver is not None:
            await aclose_checkpointer(self.saver)

    # -- threads -------------------------------------------------------------------------

    async def thread(self, thread_id: str) -> dict[str, Any]:
        runner = await self.ready()
        record = await runner.store.get_thread(thread_id)
        graph_id = record["metadata"].get("graph_id")
        if graph_id in self.registry.graphs:
            snapshot = await self.registry.graph(graph_id).aget_state(_cfg(thread_id))
            record["values"] = jsonable(snapshot.values)
            record["interrupts"] = {t.id: jsonable(list(t.interrupts))
                                    for t in snapshot.tasks if t.interrupts}
        return record

    async def _graph_of(self, thread_id: str):
        runner = await self.ready()
        record = await runner.store.get_thread(thread_id)
        graph_id = record["metadata"].get("graph_id")
        return self.registry.graph(graph_id) if graph_id in self.registry.graphs else None

    async def state(self, thread_id: str, checkpoint_id: str | None = None) -> dict[str, Any]:
        graph = await self._graph_of(thread_id)
        if graph is None:
            return _empty_state(thread_id)
        cfg = _cfg(thread_id)
        if checkpoint_id:
            cfg["configurable"]["checkpoint_id"] = checkpoint_id
        return thread_state(await graph.aget_state(cfg))

    async def update_state(self, thread_id: str, body: StateUpdate) -> dict[str, Any]:
        graph = await self._graph_of(thread_id)
        if graph is None:
            raise ApiError(409, f"thread {thread_id!r} has no graph yet: run an assistant on "
                                "it first", "conflict_error", code="thread_without_graph")
        cfg = _cfg(thread_id)
        if body.checkpoint_id:
            cfg["configurable"]["checkpoint_id"] = body.checkpoint_id
        new = await graph.aupdate_state(cfg, body.values, as_node=body.as_node)
        from agents.server.encoding import checkpoint_ref

        return {"checkpoint": checkpoint_ref(new)}

    async def history(self, thread_id: str, body: History) -> list[dict[str, Any]]:
        graph = await self._graph_of(thread_id)
        if graph is None:
            return []
        cfg = _cfg(thread_id)
        if body.checkpoint is not None and body.checkpoint.checkpoint_id:
            cfg["configurable"]["checkpoint_id"] = body.checkpoint.checkpoint_id
        before = body.before
        if before is not None and not isinstance(before, str):
            before = before.checkpoint_id
        out = []
        async for snapshot in graph.aget_state_history(
                cfg, limit=body.limit, filter=body.metadata,
                before=_cfg(thread_id, before) if before else None):
            out.append(thread_state(snapshot))
        return out

    async def delete_thread(self, thread_id: str) -> None:
        runner = await self.ready()
        await runner.delete_thread(thread_id)

    # -- runs ----------------------------------------------------------------------------

    async def start_run(self, thread_id: str | None, body: RunCreate, *, stream: bool
                        ) -> Execution:
        """A run of the assistant on the thread (created when the client asks with
        ``if_not_exists: create``), or on a temporary thread for a stateless run."""
        assistant = self.registry.find(body.assistant_id)
        runner = await self.ready()
        temporary = thread_id is None
        if temporary:
            thread_id = str(uuid.uuid4())
            await runner.store.create_thread(thread_id, {"graph_id": assistant.graph_id},
                                             temporary=True)
        else:
            try:
                record = await runner.store.get_thread(thread_id)
            except ApiError as err:
                if err.status != 404 or body.if_not_exists != "create":
                    raise
                record = await runner.store.create_thread(thread_id, {}, if_exists="do_nothing")
            bound = record["metadata"].get("graph_id")
            if bound and bound != assistant.graph_id:
                raise ApiError(409, f"thread {thread_id!r} belongs to graph {bound!r}, not "
                                    f"{assistant.graph_id!r}", "conflict_error",
                               code="thread_graph_mismatch", param="assistant_id")
            if not bound:  # its state is read through this graph from now on
                await runner.store.update_thread(thread_id, metadata={
                    "graph_id": assistant.graph_id, "assistant_id": assistant.assistant_id})
        body = body.model_copy(update={"assistant_id": assistant.assistant_id})
        return await runner.start(thread_id, assistant.graph_id, body, temporary=temporary,
                                  stream=stream)


def _cfg(thread_id: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ""}
    if checkpoint_id:
        c["checkpoint_id"] = checkpoint_id
    return {"configurable": c}


__all__ = ["Service"]
