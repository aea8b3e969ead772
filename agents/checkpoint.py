"""The agents' checkpointer: LangGraph's own ``PostgresSaver`` (``AsyncPostgresSaver`` for the
asynchronous Serve app) over a psycopg connection pool, on the platform's PostgreSQL.

A thread's state (every checkpoint of a compiled graph run with
``{"configurable": {"thread_id": ...}}``) lives in the database, so any process with the DSN
-- another replica, the next start of the app -- continues the thread.

The pool checks each connection before lending it (``ConnectionPool.check_connection``): a
connection broken by a database restart is thrown away and replaced, so one pool outlives any
number of PostgreSQL restarts. Connections are opened as LangGraph's savers need them:
autocommit, no server-side prepared statements, rows as dicts.

The DSN: the platform writes it to a 0600 file whose path ``rayplane env`` exports as
``RAYPLANE_POSTGRES_DSN_FILE``; ``RAYPLANE_AGENTS_DSN`` (a DSN itself) points the agents at
another database and wins over the file. A DSN's password never appears in an error.

    saver = postgres_checkpointer()            # dsn_from_env(); setup() done
    graph = builder.compile(checkpointer=saver)
    ...
    close_checkpointer(saver)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import psycopg
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from raycluster.errors import PlatformError

#: Exported by ``rayplane env``: the path of the file holding the platform's DSN.
DSN_FILE_ENV = "RAYPLANE_POSTGRES_DSN_FILE"
#: A DSN for the agents' database; wins over the platform's file.
DSN_ENV = "RAYPLANE_AGENTS_DSN"
#: Serialises ``setup()`` (LangGraph's migrations) between processes starting at once.
SETUP_LOCK = int.from_bytes(b"rayplane", "big")
#: What every pooled connection is opened with (what LangGraph's savers expect).
CONNECTION_KWARGS = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row,
                     "connect_timeout": 5}

_URI_PASSWORD = re.compile(
    r"^(?P<head>[a-z][a-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***`` (URI or ``key=value`` form)."""
    dsn = _URI_PASSWORD.sub(lambda m: f"{m['head']}:***@", dsn.strip())
    dsn = re.sub(r"([?&]password=)[^&#]*", r"\1***", dsn, flags=re.IGNORECASE)
    return _KV_PASSWORD.sub(r"\1***", dsn) if "://" not in dsn else dsn


def dsn_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The agents' DSN: ``RAYPLANE_AGENTS_DSN``, else the content of the file named by
    ``RAYPLANE_POSTGRES_DSN_FILE``; PlatformError when neither gives one."""
    env = os.environ if environ is None else environ
    if env.get(DSN_ENV, "").strip():
        return env[DSN_ENV].strip()
    path = env.get(DSN_FILE_ENV, "").strip()
    if not path:
        raise PlatformError(f"no PostgreSQL DSN for the agents: set {DSN_FILE_ENV} (exported "
                            f"by `rayplane env`) or {DSN_ENV}")
    try:
        dsn = Path(path).read_text().strip()
    except OSError as err:
        raise PlatformError(f"{DSN_FILE_ENV}={path}: cannot read the DSN file "
                            f"({err.strerror or err}); is the platform up?") from None
    if not dsn:
        raise PlatformError(f"{DSN_FILE_ENV}={path}: the DSN file is empty")
    return dsn


def _unreachable(dsn: str, err: BaseException) -> PlatformError:
    reason = " ".join(str(err).split()) or type(err).__name__
    password = _password(dsn)
    if password:
        reason = reason.replace(password, "***")
    return PlatformError(f"PostgreSQL at {redact_dsn(dsn)} is unreachable: {reason}")


def _password(dsn: str) -> str:
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("password") or ""
    except psycopg.Error:
        return ""


def _pool_kwargs(dsn: str, max_size: int, timeout: float) -> dict:
    # Two connections at least: setup() takes one while the setup lock holds another.
    return {"conninfo": dsn, "kwargs": dict(CONNECTION_KWARGS), "min_size": 1,
            "max_size": max(2, max_size), "timeout": timeout, "open": False,
            "name": "rayplane-agents-checkpoints"}


def postgres_checkpointer(dsn: str | None = None, *, max_size: int = 4,
                          timeout: float = 10.0) -> PostgresSaver:
    """LangGraph's ``PostgresSaver`` over a health-checked pool, its tables set up.

    ``dsn`` defaults to ``dsn_from_env()``; ``timeout`` bounds the first connection and every
    later wait for a pooled one. Close it with ``close_checkpointer``. PlatformError (one line,
    no password) when the database cannot be reached."""
    dsn = dsn or dsn_from_env()
    try:  # the real reason (refused, wrong password), not the pool's timeout
        psycopg.connect(dsn, connect_timeout=max(1, int(timeout))).close()
    except psycopg.Error as err:
        raise _unreachable(dsn, err) from None
    pool = ConnectionPool(check=ConnectionPool.check_connection,
                          **_pool_kwargs(dsn, max_size, timeout))
    try:
        pool.open(wait=True, timeout=timeout)
        saver = PostgresSaver(pool)
        with pool.connection() as lock:
            lock.execute("SELECT pg_advisory_lock(%s)", (SETUP_LOCK,))
            try:
                saver.setup()
            finally:
                lock.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
    except (psycopg.Error, PoolTimeout) as err:
        pool.close()
        raise _unreachable(dsn, err) from None
    return saver


async def async_postgres_checkpointer(dsn: str | None = None, *, max_size: int = 4,
                                      timeout: float = 10.0) -> AsyncPostgresSaver:
    """``postgres_checkpointer`` for asyncio: LangGraph's ``AsyncPostgresSaver`` over a
    health-checked ``AsyncConnectionPool``. Close it with ``aclose_checkpointer``."""
    dsn = dsn or dsn_from_env()
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=max(1, int(timeout)))
        await conn.close()
    except psycopg.Error as err:
        raise _unreachable(dsn, err) from None
    pool = AsyncConnectionPool(check=AsyncConnectionPool.check_connection,
                               **_pool_kwargs(dsn, max_size, timeout))
    try:
        await pool.open(wait=True, timeout=timeout)
        saver = AsyncPostgresSaver(pool)
        async with pool.connection() as lock:
            await lock.execute("SELECT pg_advisory_lock(%s)", (SETUP_LOCK,))
            try:
                await saver.setup()
            finally:
                await lock.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
    except (psycopg.Error, PoolTimeout) as err:
        await pool.close()
        raise _unreachable(dsn, err) from None
    return saver


def close_checkpointer(saver: PostgresSaver) -> None:
    """Close the pool under a checkpointer from ``postgres_checkpointer``."""
    if isinstance(saver.conn, ConnectionPool):
        saver.conn.close()


async def aclose_checkpointer(saver: AsyncPostgresSaver) -> None:
    """Close the pool under a checkpointer from ``async_postgres_checkpointer``."""
    if isinstance(saver.conn, AsyncConnectionPool):
        await saver.conn.close()


__all__ = [
    "DSN_ENV",
    "DSN_FILE_ENV",
    "aclose_checkpointer",
    "async_postgres_checkpointer",
    "close_checkpointer",
    "dsn_from_env",
    "postgres_checkpointer",
    "redact_dsn",
]
