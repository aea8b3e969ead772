"""The CPU engine: PyTorch + ``transformers`` with a KV cache and continuous batching.

Two halves, as in vLLM's V1 engine: the *core* (serve/engines/cpu_core.py: the model, the
running batch, the step loop, detokenization) runs in a child process, and this front runs
in the caller's process (a Serve replica, a test, the benchmark): it checks requests against
the model's limits, hands sequences to the core, and turns the core's per-step messages into
one async stream per sequence. Keeping the model's Python-heavy forward pass out of the
replica's process keeps it off the GIL that HTTP, JSON and Ray's threads need (see the core's
docstring for the measurement).

The front reads the core's socket from the event loop (``add_reader``), so a step's deltas
reach their streams without a thread hop; a stream closed early (the client went away, the
task was cancelled) sends an abort, and the core drops the sequence from its batch at the
next step. If the core process dies, every open stream ends with a 500 and new requests get
a retryable 503; ``alive()`` is what the replica's health check reads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from serve.engines.base import Delta, EngineError, EngineOverloaded, SamplingParams
from serve.engines.cpu_core import CoreStats

logger = logging.getLogger(__name__)

#: How long the core may take to load its model before the engine gives up.
CORE_START_TIMEOUT_S = float(os.environ.get("RAYPLANE_ENGINE_START_TIMEOUT_S", "600"))


@dataclass
class EngineStats:
    running: int
    waiting: int
    finished: int
    aborted: int
    generated_tokens: int
    steps: int


@dataclass(eq=False)
class _Stream:
    """The front's side of one sequence: where the core's deltas for it are queued."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    #: Set when the last delta is queued, so a coalescing reader never waits past the end.
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False


class CPUEngine:
    """Continuous-batching generation for one Hugging Face causal LM folder on CPU.

    ``max_num_seqs`` caps the sequences decoded together (vLLM's name); ``max_waiting`` caps
    the queue behind them, beyond which :class:`EngineOverloaded` (503 + Retry-After) is
    raised instead of letting latency grow without bound. ``num_threads``: torch threads of
    the core's forward pass.
    """

    def __init__(self, model_dir: str | Path, *, max_num_seqs: int = 16,
                 max_model_len: int | None = None, max_waiting: int | None = None,
                 num_threads: int | None = None):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting if max_waiting is not None else 8 * max_num_seqs
        self._proc, self._conn = _start_core(self.model_dir, {
            "max_num_seqs": max_num_seqs, "max_model_len": max_model_len,
            "num_threads": num_threads})
        # The child is stopped with this engine, or with this process at the latest.
        self._finalizer = weakref.finalize(self, _stop_core, self._proc, self._conn)
        info = _wait_ready(self._proc, self._conn, self.model_dir)
        self.context_length = info["context_length"]
        self.max_model_len = info["max_model_len"]
        self.eos_token_ids = set(info["eos_token_ids"])
        self.pad_token_id = info["pad_token_id"]
        # The front tokenizes prompts and renders chat templates; the core detokenizes.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core_stats = CoreStats()
        self._aborted = 0
        self._dead: str | None = None  # why the core is gone, once it is

    # -- public --------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def stats(self) -> EngineStats:
        s = self._core_stats
        return EngineStats(running=s.running, waiting=self._waiting(), finished=s.finished,
                           aborted=self._aborted, generated_tokens=s.generated_tokens,
                           steps=s.steps)

    def alive(self) -> str | None:
        """None while the core runs; else why it stopped."""
        if self._dead is None and self._proc.poll() is not None:
            self._dead = f"the engine core process exited with code {self._proc.returncode}"
        return self._dead

    def check(self, prompt_ids: list[int], params: SamplingParams,
              max_tokens_param: str = "max_tokens") -> int:
        """Refuse what cannot run (400) and return the sequence's token budget."""
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty", param="prompt")
        if n >= self.max_model_len:
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {n} tokens, leaving no room to generate", param="messages",
                code="context_length_exceeded")
        room = self.max_model_len - n
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + params.max_tokens} tokens ({n} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.", param=max_tokens_param,
                code="context_length_exceeded")
        return params.max_tokens

    def ensure_capacity(self, sequences: int = 1) -> None:
        """Refuse (503 + Retry-After) when the queue cannot take ``sequences`` more."""
        if self.alive() is not None:
            raise EngineOverloaded(f"the engine is not running ({self._dead}); retry shortly")
        waiting = self._waiting()
        if waiting + sequences > self.max_waiting:
            raise EngineOverloaded(f"the engine has {waiting} sequences waiting "
                                   f"(max_waiting {self.max_waiting}); retry shortly")

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str = "", *, max_tokens: int | None = None,
                       coalesce_s: float = 0.0) -> AsyncIterator[Delta]:
        """Yield deltas of one sequence until it finishes. Closing the generator early (the
        client went away, the task was cancelled) removes the sequence from the batch.

        ``coalesce_s`` > 0: after the first delta that carries text, yield at most once per
        ``coalesce_s`` (all tokens produced meanwhile in one delta; the last one is never held
        back); ``inf``: deltas up to the first text at once, then everything at the end. A
        streamed token costs a JSON event and messages between processes; batching them is
        what keeps a 16-stream server from spending its CPU on messages (Ray Serve LLM batches
        every 50 ms by default). Tokens without text (a special token, a stop-string prefix
        held back) do not start the batching: the client's first visible text is never late."""
        budget = max_tokens if max_tokens is not None else self.check(prompt_ids, params)
        self.ensure_capacity()
        self._attach()
        seq_id = next(self._ids)
        stream = _Stream(loop=asyncio.get_running_loop())
        self._streams[seq_id] = stream
        self._send(("add", seq_id, list(prompt_ids), params, budget, time.perf_counter()))
        try:
            shown = False  # has a delta with text gone out yet
            while True:
                if shown and coalesce_s > 0 and not stream.ended.is_set():
                    if coalesce_s == float("inf"):
                        await stream.ended.wait()
                    else:
                        try:
                            await asyncio.wait_for(stream.ended.wait(), coalesce_s)
                        except TimeoutError:
                            pass
                delta = await stream.queue.get()
                # A reader slower than the engine gets everything produced since its last
                # read in one delta: streaming never falls behind generation.
                while not isinstance(delta, EngineErrorDelta) and not stream.queue.empty():
                    nxt = stream.queue.get_nowait()
                    delta = nxt if isinstance(nxt, EngineErrorDelta) else delta.merge(nxt)
                if isinstance(delta, EngineErrorDelta):
                    raise EngineError(f"generation failed: {delta.error}", status=500,
                                      type="internal_server_error", code="engine_error")
                shown = shown or bool(delta.text)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not stream.finished:
                self._aborted += 1
                self._streams.pop(seq_id, None)
                self._send(("abort", seq_id), quiet=True)

    async def close(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the core process (also done when the engine is garbage-collected)."""
        self._detach()
        self._finalizer()
        self._dead = self._dead or "the engine was shut down"

    # -- the core's messages ---------------------------------------------------------------

    def _waiting(self) -> int:
        """Sequences handed over that cannot be running (the core runs max_num_seqs)."""
        return max(0, len(self._streams) - self.max_num_seqs)

    def _attach(self) -> None:
        """Read the core's messages on the current event loop. Streams opened on another
        loop (a finished ``asyncio.run``) can never be read again: they are aborted."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._detach()
        for seq_id in [k for k, s in self._streams.items() if s.loop is not loop]:
            del self._streams[seq_id]
            self._send(("abort", seq_id), quiet=True)
        loop.add_reader(self._conn.fileno(), self._on_message)
        self._loop = loop

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (OSError, ValueError, RuntimeError):  # socket or loop already gone
                pass
        self._loop = None

    def _send(self, msg: tuple, *, quiet: bool = False) -> None:
        try:
            self._conn.send(msg)
        except OSError as err:
            self._core_gone(f"the engine core is unreachable: {err}")
            if not quiet:
                raise EngineOverloaded(f"the engine is not running ({self._dead}); "
                                       "retry shortly") from None

    def _on_message(self) -> None:
        try:
            while self._conn.poll():
                msg = self._conn.recv()
                if msg[0] == "step":
                    _, deltas, self._core_stats = msg
                    for seq_id, delta in deltas:
                        stream = self._streams.get(seq_id)
                        if stream is None:  # aborted meanwhile
                            continue
                        stream.queue.put_nowait(delta)
                        if delta.finish_reason is not None:
                            stream.finished = True
                            stream.ended.set()
                            del self._streams[seq_id]
                elif msg[0] == "error":
                    _, seq_ids, error, self._core_stats = msg
                    for seq_id in seq_ids:
                        self._fail(seq_id, error)
        except (EOFError, OSError) as err:
            code = self._proc.poll()
            self._core_gone(f"the engine core process exited (code {code})" if code is not None
                            else f"the engine core's socket failed: {err!r}")
        except Exception as err:  # a message we cannot read: the streams would never end
            logger.exception("unreadable message from the engine core")
            self._core_gone(f"unreadable message from the engine core: {err!r}")

    def _fail(self, seq_id: int, error: str) -> None:
        stream = self._streams.pop(seq_id, None)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(EngineErrorDelta(error))
            stream.ended.set()

    def _core_gone(self, why: str) -> None:
        if self._dead is None:
            logger.error("%s; failing %d open streams", why, len(self._streams))
            self._dead = why
        self._detach()
        for seq_id in list(self._streams):
            self._fail(seq_id, why)


class EngineErrorDelta(Delta):
    """Queued for a sequence whose step failed; ``generate`` raises it as a 500."""

    def __init__(self, err: Exception | str):
        super().__init__(finish_reason="error")
        self.error = err


def _start_core(model_dir: Path, options: dict) -> tuple[subprocess.Popen, Connection]:
    """``python -m serve.engines.cpu_core`` on one end of a socket pair. A plain child process
    rather than ``multiprocessing``: spawn would re-import the parent's ``__main__`` (a Ray
    worker's), fork would copy a process full of threads."""
    ours, theirs = socket.socketpair()
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding serve/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.engines.cpu_core", str(theirs.fileno()),
             json.dumps({"model_dir": str(model_dir), **options})],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, Connection(ours.detach())


def _wait_ready(proc: subprocess.Popen, conn: Connection, model_dir: Path) -> dict:
    deadline = time.monotonic() + CORE_START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if conn.poll(0.2):
                kind, payload = conn.recv()
                if kind == "ready":
                    return payload
                raise RuntimeError(f"the engine could not load {model_dir}: {payload}")
            if proc.poll() is not None:
                raise RuntimeError(f"the engine core process exited with code "
                                   f"{proc.returncode} while loading {model_dir}")
        raise RuntimeError(f"the engine core did not load {model_dir} within "
                           f"{CORE_START_TIMEOUT_S:.0f} s (RAYPLANE_ENGINE_START_TIMEOUT_S)")
    except BaseException:
        _stop_core(proc, conn)
        raise


def _stop_core(proc: subprocess.Popen, conn: Connection) -> None:
    try:
        conn.send(("close",))
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    conn.close()


__all__ = ["CPUEngine", "EngineStats"]
