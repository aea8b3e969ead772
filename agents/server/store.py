"""Threads and runs of the agents API in PostgreSQL, beside LangGraph's checkpoint tables in
the same database and over the same health-checked connection pool (agents.checkpoint).

The checkpointer keeps a thread's *state*; these two tables keep what the LangGraph server
API adds around it: a thread's metadata and status, and each run's status. One run at a time
per thread is PostgreSQL's to enforce, so it holds across replicas: a partial unique index
admits one ``running`` row per thread. A run is inserted ``running`` (multitask strategy
``reject``: a second insert violates the index and the client gets 409) or ``pending``
(``enqueue``: it is claimed, oldest first, when the running one ends). A running run's replica
beats a heartbeat; a run whose replica died stops beating and is marked ``error`` by the next
claim on its thread, so a lost replica never locks a thread for good.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from agents.server.errors import ApiError, busy, not_found

#: A running run whose heartbeat is older than this lost its replica.
STALE_S = 20
#: Serialises the tables' creation between replicas starting together.
SETUP_LOCK = int.from_bytes(b"rpagents", "big")

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents_threads (
    thread_id text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    metadata jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'idle',
    temporary boolean NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS agents_runs (
    run_id text PRIMARY KEY,
    thread_id text NOT NULL REFERENCES agents_threads ON DELETE CASCADE,
    assistant_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    status text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    multitask_strategy text NOT NULL,
    kwargs jsonb NOT NULL DEFAULT '{}',
    error jsonb,
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    cancel text);
CREATE UNIQUE INDEX IF NOT EXISTS agents_runs_one_running
    ON agents_runs (thread_id) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS agents_runs_by_thread ON agents_runs (thread_id, created_at);
"""
_REAP = (f"UPDATE agents_runs SET status = 'error', updated_at = clock_timestamp(), "
         f"error = %s WHERE thread_id = %s AND status = 'running' "
         f"AND heartbeat_at < clock_timestamp() - interval '{STALE_S} seconds'")
_LOST = Jsonb({"error": {"message": "the replica running this run was lost", "type":
                         "server_error", "param": None, "code": "replica_lost"}})


def _thread(row: dict[str, Any]) -> dict[str, Any]:
    return {"thread_id": row["thread_id"], "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(), "metadata": row["metadata"],
            "status": row["status"], "values": {}, "interrupts": {}}


def _run(row: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": row["run_id"], "thread_id": row["thread_id"],
            "assistant_id": row["assistant_id"], "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(), "status": row["status"],
            "metadata": row["metadata"], "multitask_strategy": row["multitask_strategy"],
            "kwargs": row["kwargs"]}


class Store:
    """The tables over ``pool`` (a psycopg ``AsyncConnectionPool`` lending autocommit
    connections with dict rows); ``timeout`` bounds each wait for a connection."""

    def __init__(self, pool, timeout: float):
        self.pool, self.timeout = pool, timeout

    def _conn(self):
        return self.pool.connection(timeout=self.timeout)

    async def _all(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        async with self._conn() as conn:
            cur = await conn.execute(sql, params)
            return list(await cur.fetchall()) if cur.description else []

    async def _one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        rows = await self._all(sql, params)
        return rows[0] if rows else None

    async def setup(self) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK,))
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    await conn.execute(statement)

    # -- threads -------------------------------------------------------------------------

    async def create_thread(self, thread_id: str, metadata: dict[str, Any] | None = None, *,
                            if_exists: str = "raise", temporary: bool = False
                            ) -> dict[str, Any]:
        row = await self._one(
            "INSERT INTO agents_threads (thread_id, metadata, temporary) VALUES (%s, %s, %s) "
            "ON CONFLICT (thread_id) DO NOTHING RETURNING *",
            (thread_id, Jsonb(metadata or {}), temporary))
        if row is None:
            if if_exists != "do_nothing":
                raise ApiError(409, f"thread {thread_id!r} already exists", "conflict_error",
                               code="thread_exists", param="thread_id")
            return await self.get_thread(thread_id)
        return _thread(row)

    async def get_thread(self, thread_id: str) -> dict[str, Any]:
        row = await self._one("SELECT * FROM agents_threads WHERE thread_id = %s",
                              (thread_id,))
        if row is None:
            raise not_found("thread", thread_id)
        return _thread(row)

    async def search_threads(self, *, metadata: dict | None, status: str | None,
                             ids: list[str] | None, limit: int, offset: int) -> list[dict]:
        where, params = ["NOT temporary"], []
        if metadata:
            where.append("metadata @> %s")
            params.append(Jsonb(metadata))
        if status:
            where.append("status = %s")
            params.append(status)
        if ids:
            where.append("thread_id = ANY(%s)")
            params.append(list(ids))
        rows = await self._all(
            f"SELECT * FROM agents_threads WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC LIMIT %s OFFSET %s", (*params, limit, offset))
        return [_thread(r) for r in rows]

    async def update_thread(self, thread_id: str, *, metadata: dict | None = None,
                            status: str | None = None) -> dict[str, Any]:
        row = await self._one(
            "UPDATE agents_threads SET metadata = metadata || %s, status = coalesce(%s, "
            "status), updated_at = clock_timestamp() WHERE thread_id = %s RETURNING *",
            (Jsonb(metadata or {}), status, thread_id))
        if row is None:
            raise not_found("thread", thread_id)
        return _thread(row)

    async def delete_thread(self, thread_id: str) -> None:
        row = await self._one("DELETE FROM agents_threads WHERE thread_id = %s RETURNING 1",
                              (thread_id,))
        if row is None:
            raise not_found("thread", thread_id)

    # -- runs ----------------------------------------------------------------------------

    async def create_run(self, run_id: str, thread_id: str, assistant_id: str, *,
                         strategy: str, metadata: dict | None, kwargs: dict[str, Any]
                         ) -> dict[str, Any]:
        """Insert the run: ``running`` when the thread is free (409 when it is not, with
        ``reject``), else ``pending`` behind the running one (``enqueue``)."""
        await self._all(_REAP, (_LOST, thread_id))
        params = (run_id, thread_id, assistant_id, Jsonb(metadata or {}), strategy,
                  Jsonb(kwargs))
        insert = ("INSERT INTO agents_runs (run_id, thread_id, assistant_id, metadata, "
                  "multitask_strategy, kwargs, status) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                  "RETURNING *")
        if strategy in ("interrupt", "rollback"):  # LangGraph's: stop the running one first
            await self._all("UPDATE agents_runs SET cancel = %s WHERE thread_id = %s AND "
                            "status = 'running'", (strategy, thread_id))
        if strategy == "reject":
            queued = await self._one("SELECT 1 FROM agents_runs WHERE thread_id = %s AND "
                                     "status = 'pending' LIMIT 1", (thread_id,))
            if queued:
                raise busy(thread_id)
            try:
                row = await self._one(insert, (*params, "running"))
            except psycopg.errors.UniqueViolation:
                raise busy(thread_id) from None
        else:
            row = await self._one(insert, (*params, "pending"))
        await self.update_thread(thread_id, status="busy")
        return _run(row)

    async def claim(self, run_id: str) -> bool:
        """Start a pending run when it is the oldest pending one of a thread that runs none."""
        run = await self._one("SELECT thread_id FROM agents_runs WHERE run_id = %s", (run_id,))
        if run is None:
            return False
        await self._all(_REAP, (_LOST, run["thread_id"]))
        try:
            row = await self._one(
                "UPDATE agents_runs r SET status = 'running', heartbeat_at = clock_timestamp(),"
                " updated_at = clock_timestamp() WHERE run_id = %s AND status = 'pending' AND "
                "NOT EXISTS (SELECT 1 FROM agents_runs o WHERE o.thread_id = r.thread_id AND "
                "o.status = 'pending' AND o.created_at < r.created_at) RETURNING run_id",
                (run_id,))
        except psycopg.errors.UniqueViolation:
            return False
        if row is not None:
            await self.update_thread(run["thread_id"], status="busy")
        return row is not None

    async def heartbeat(self, run_id: str) -> str | None:
        """Beat; the cancel action asked for this run, if any."""
        row = await self._one("UPDATE agents_runs SET heartbeat_at = clock_timestamp() WHERE "
                              "run_id = %s RETURNING cancel, status", (run_id,))
        return row["cancel"] if row else None

    async def finish_run(self, run_id: str, status: str, error: dict | None = None) -> None:
        await self._all("UPDATE agents_runs SET status = %s, error = %s, updated_at = "
                        "clock_timestamp() WHERE run_id = %s",
                        (status, None if error is None else Jsonb(error), run_id))

    async def get_run(self, thread_id: str, run_id: str) -> dict[str, Any]:
        row = await self._one("SELECT * FROM agents_runs WHERE run_id = %s AND thread_id = %s",
                              (run_id, thread_id))
        if row is None:
            raise not_found("run", run_id)
        out = _run(row)
        out["error"] = row["error"]
        return out

    async def list_runs(self, thread_id: str, *, limit: int, offset: int,
                        status: str | None) -> list[dict[str, Any]]:
        await self.get_thread(thread_id)
        rows = await self._all(
            "SELECT * FROM agents_runs WHERE thread_id = %s AND (%s::text IS NULL OR status = "
            "%s) ORDER BY created_at DESC LIMIT %s OFFSET %s",
            (thread_id, status, status, limit, offset))
        return [_run(r) for r in rows]

    async def cancel_run(self, thread_id: str, run_id: str, action: str) -> dict[str, Any]:
        """A pending run ends at once; a running one is flagged for its replica to stop."""
        await self.get_run(thread_id, run_id)
        await self._all("UPDATE agents_runs SET status = 'interrupted', updated_at = "
                        "clock_timestamp() WHERE run_id = %s AND status = 'pending'", (run_id,))
        await self._all("UPDATE agents_runs SET cancel = %s WHERE run_id = %s AND status = "
                        "'running'", (action, run_id))
        return await self.get_run(thread_id, run_id)

    async def delete_run(self, thread_id: str, run_id: str) -> None:
        row = await self._one("DELETE FROM agents_runs WHERE run_id = %s AND thread_id = %s "
                              "RETURNING 1", (run_id, thread_id))
        if row is None:
            raise not_found("run", run_id)


__all__ = ["STALE_S", "Store"]
