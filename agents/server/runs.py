"""Running a graph for the agents API: one asyncio task per run, in the replica that took
the request, streaming LangGraph's events to whoever listens.

A run is a row of ``agents_runs`` (store.py) and a task here. The task waits for its turn
when it was queued (``enqueue``), streams ``graph.astream`` in the asked modes, beats the
run's heartbeat (which also carries a cancel asked on another replica), and at the end
records the run's status (``success`` -- also when the graph stopped at an interrupt --
``error`` or ``interrupted``) and the thread's (``idle``, ``interrupted``, ``error``).
Events reach listeners through a queue: ``metadata`` first, then each mode's events in graph
order, the final ``values``, and ``end`` (``error`` with the error body instead, when the run
failed). The run's result, what ``wait`` and ``join`` answer, is the thread's final values,
with ``__interrupt__`` when the graph stopped for a person.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from agents.metrics import RunMetrics
from agents.server.encoding import jsonable, wire_mode
from agents.server.errors import ApiError, from_exception
from agents.server.models import RunCreate
from agents.server.store import Store
from agents.tracing import run_config

log = logging.getLogger(__name__)
HEARTBEAT_S = 2.0
CLAIM_POLL_S = 0.25
_END = object()


@dataclass
class Execution:
    """A run in this replica: its record, its task and its listeners' queues."""

    run: dict[str, Any]
    graph_id: str
    task: asyncio.Task | None = None
    listeners: list[asyncio.Queue] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: ApiError | None = None
    status: str = "pending"
    queue: asyncio.Queue | None = None
    ran: bool = False  # it got its turn on the thread (a queued run may be cancelled first)

    def emit(self, event: str, data: Any) -> None:
        for q in self.listeners:
            q.put_nowait((event, data))

    def listen(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.listeners.append(q)
        return q


def graph_config(thread_id: str, body: RunCreate, run: dict[str, Any], graph_id: str
                 ) -> dict[str, Any]:
    """The run's LangGraph config: the client's (its ``configurable``, ``recursion_limit``,
    tags), the thread, and the run's ids as metadata (which MLflow traces carry)."""
    user = body.config.model_dump(exclude_none=True) if body.config is not None else {}
    extra: dict[str, Any] = {k: v for k, v in user.items()
                             if k in ("recursion_limit", "tags", "configurable")}
    extra["metadata"] = {**(body.metadata or {}), "run_id": run["run_id"],
                         "assistant_id": run["assistant_id"], "graph_id": graph_id}
    config = run_config(thread_id, **extra)
    if body.checkpoint_id:
        config["configurable"]["checkpoint_id"] = body.checkpoint_id
    return config


def graph_input(body: RunCreate) -> Any:
    if body.command is not None:
        from langgraph.types import Command

        c = body.command
        return Command(resume=c.resume, update=c.update,
                       goto=c.goto if c.goto is not None else ())
    return body.input


def result_of(snapshot: Any) -> dict[str, Any]:
    """What ``wait``/``join`` answer: the final values, and the pending interrupts."""
    values = jsonable(snapshot.values) if isinstance(snapshot.values, dict) else {}
    interrupts = list(getattr(snapshot, "interrupts", ()) or ())
    if interrupts:
        values["__interrupt__"] = jsonable(interrupts)
    return values


def thread_status(snapshot: Any, run_status: str) -> str:
    """A thread waiting for an answer stays ``interrupted`` even when a run's answer was
    refused; else a failed run leaves it ``error``."""
    if getattr(snapshot, "interrupts", ()):
        return "interrupted"
    return "error" if run_status == "error" else "idle"


class Runner:
    """Starts and tracks this replica's runs."""

    def __init__(self, store: Store, graphs: dict[str, Any], checkpointer: Any):
        self.store, self.graphs, self.checkpointer = store, graphs, checkpointer
        self.local: dict[str, Execution] = {}
        self.metrics = RunMetrics()  # runs by graph and status (docs/monitoring.md)

    async def start(self, thread_id: str, graph_id: str, body: RunCreate, *,
                    temporary: bool = False, stream: bool = False) -> Execution:
        """Record the run (409 on a busy thread with ``reject``) and start its task."""
        run = await self.store.create_run(
            str(uuid.uuid4()), thread_id, body.assistant_id,
            strategy=body.multitask_strategy, metadata=body.metadata,
            kwargs=body.model_dump(mode="json", exclude_none=True))
        ex = Execution(run=run, graph_id=graph_id, status=run["status"])
        if stream:  # listening before the task starts: no event is missed
            ex.queue = ex.listen()
        ex.task = asyncio.create_task(self._execute(ex, body, temporary))
        self.local[run["run_id"]] = ex
        ex.task.add_done_callback(lambda _t: self.local.pop(run["run_id"], None))
        return ex

    async def events(self, ex: Execution) -> AsyncIterator[tuple]:
        """(event, data) pairs of a run started with ``stream=True``, until it ends."""
        if ex.queue is None:
            raise RuntimeError("events() of a run started without stream=True")
        while True:
            item = await ex.queue.get()
            if item is _END:
                return
            yield item

    async def _claim(self, ex: Execution) -> bool:
        run_id = ex.run["run_id"]
        while not await self.store.claim(run_id):
            run = await self.store.get_run(ex.run["thread_id"], run_id)
            if run["status"] != "pending":  # cancelled while queued
                ex.status = run["status"]
                return False
            await asyncio.sleep(CLAIM_POLL_S)
        return True

    async def _beat(self, ex: Execution, task: asyncio.Task) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                if await self.store.heartbeat(ex.run["run_id"]):
                    task.cancel()
                    return
            except Exception as err:  # noqa: BLE001 - a missed beat is retried
                log.warning("heartbeat of run %s: %s", ex.run["run_id"], err)

    async def _execute(self, ex: Execution, body: RunCreate, temporary: bool) -> None:
        thread_id, run_id = ex.run["thread_id"], ex.run["run_id"]
        graph = self.graphs[ex.graph_id]
        config = graph_config(thread_id, body, ex.run, ex.graph_id)
        ex.emit("metadata", {"run_id": run_id, "thread_id": thread_id})
        status, snapshot, beat = "error", None, None
        started = time.monotonic()
        try:
            if ex.status == "pending" and not await self._claim(ex):
                status = ex.status
                return
            ex.ran = True
            ex.status = "running"
            beat = asyncio.create_task(self._beat(ex, asyncio.current_task()))
            modes = [wire_mode(m) for m in body.modes()]
            kwargs = {k: v for k, v in (("interrupt_before", body.interrupt_before),
                                        ("interrupt_after", body.interrupt_after)) if v}
            async for mode, chunk in graph.astream(graph_input(body), config,
                                                   stream_mode=modes, **kwargs):
                ex.emit(mode, jsonable(chunk))
            snapshot = await graph.aget_state({"configurable": {"thread_id": thread_id}})
            ex.result = result_of(snapshot)
            status = "success"
        except asyncio.CancelledError:
            status = "interrupted"
            ex.error = ApiError(409, f"run {run_id!r} was cancelled", "conflict_error",
                                code="run_cancelled")
        except Exception as err:  # noqa: BLE001 - the run fails, the replica goes on
            ex.error = from_exception(err)
            log.warning("run %s on thread %s failed: %s", run_id, thread_id, ex.error.message)
        finally:
            if beat is not None:
                beat.cancel()
            ex.status = status
            self.metrics.finished(ex.graph_id, status, time.monotonic() - started,
                                  ex.error.code if ex.error else None)
            await self._record(ex, graph, snapshot, temporary)

    async def _record(self, ex: Execution, graph: Any, snapshot: Any, temporary: bool) -> None:
        thread_id, run_id = ex.run["thread_id"], ex.run["run_id"]
        try:
            if ex.status == "error" and ex.error is not None:
                ex.emit("error", ex.error.body())
            with contextlib.suppress(Exception):
                if snapshot is None and ex.ran:
                    snapshot = await graph.aget_state({"configurable": {"thread_id": thread_id}})
            await self.store.finish_run(run_id, ex.status,
                                        ex.error.body() if ex.error else None)
            if temporary:
                await self.delete_thread(thread_id)
            elif ex.ran:  # a queued run cancelled before its turn leaves the thread as it is
                status = (thread_status(snapshot, ex.status) if snapshot
                          else "error" if ex.status == "error" else "idle")
                await self.store.update_thread(thread_id, status=status)
        except Exception as err:  # noqa: BLE001 - the database may be down; the reaper ends it
            log.warning("run %s: cannot record its end: %s", run_id, err)
        finally:
            if ex.status != "error":
                ex.emit("end", {"run_id": run_id, "status": ex.status})
            for q in ex.listeners:
                q.put_nowait(_END)

    async def delete_thread(self, thread_id: str) -> None:
        """The thread's row and its checkpoints."""
        await self.store.delete_thread(thread_id)
        await self.checkpointer.adelete_thread(thread_id)

    async def wait(self, ex: Execution) -> dict[str, Any]:
        """The run's result once it ends (its error when it failed)."""
        if ex.task is not None:
            try:
                await asyncio.shield(ex.task)
            except asyncio.CancelledError:
                if not ex.task.cancelled():  # this request itself is being cancelled
                    raise
        if ex.error is not None and ex.status == "error":
            raise ex.error
        return ex.result or {}

    async def join(self, thread_id: str, run_id: str) -> dict[str, Any]:
        """Wait for a run started here or on another replica; the thread's values then."""
        ex = self.local.get(run_id)
        if ex is not None and ex.run["thread_id"] == thread_id:
            with contextlib.suppress(ApiError):
                return await self.wait(ex)
            raise ex.error  # type: ignore[misc]
        while True:
            run = await self.store.get_run(thread_id, run_id)
            if run["status"] not in ("pending", "running"):
                break
            await asyncio.sleep(CLAIM_POLL_S)
        if run["status"] == "error" and run.get("error"):
            err = run["error"]["error"]
            raise ApiError(_status_of(err.get("code")), err["message"], err["type"],
                           code=err.get("code"), param=err.get("param"))
        graph_id = (await self.store.get_thread(thread_id))["metadata"].get("graph_id")
        if graph_id not in self.graphs:
            return {}
        return result_of(await self.graphs[graph_id].aget_state(
            {"configurable": {"thread_id": thread_id}}))

    async def cancel(self, thread_id: str, run_id: str, action: str) -> dict[str, Any]:
        run = await self.store.cancel_run(thread_id, run_id, action)
        ex = self.local.get(run_id)
        # A queued run sees its row cancelled and ends by itself (recording it); only a
        # running one is stopped here.
        if ex is not None and ex.ran and ex.task is not None and not ex.task.done():
            ex.task.cancel()
        return run


def _status_of(code: str | None) -> int:
    return {"model_endpoint_error": 502, "database_unavailable": 503,
            "invalid_input": 422, "invalid_update": 422}.get(code or "", 500)


__all__ = ["Execution", "Runner", "graph_config", "graph_input", "result_of", "thread_status"]
