"""The CPU engine: PyTorch + ``transformers`` with a KV cache and continuous batching.

One thread per engine runs an iteration loop (the scheme vLLM and TGI use, here on
``transformers``' own model and ``DynamicCache``):

- every iteration admits waiting requests up to ``max_num_seqs`` running sequences, prefills
  them together (left-padded, one forward pass) and merges their KV cache into the running
  batch (left-padding the shorter of the two), so a request joins at the next token boundary
  instead of waiting for the batch to drain;
- one decode forward pass then produces the next token of every running sequence, each
  sampled with its own temperature / top_p / seed;
- finished and cancelled sequences leave the batch at once (their KV rows are dropped and the
  all-padding columns trimmed), so a client that disconnects frees its slot.

The batch itself (its tensors, sampling, detokenization) is :class:`DecodeBatch`
(serve/engines/cpu_batch.py); this module is the engine around it: admission, back-pressure,
the step thread and the hand-over of deltas to the requests' event loops.

The loop runs on a thread of its own (``cpu-engine``) that steps back to back while it has
sequences and hands each step's deltas to the event loop of their requests in one callback:
it never waits for the event loop, which may be busy with HTTP, so a replica serving many
streams keeps its model busy (torch releases the GIL inside its ops; the event loop and the
step thread share the rest). Text is detokenized in the batch, with stop strings and incomplete
UTF-8 held back, so every yielded :class:`~serve.engines.base.Delta` is final.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from serve.engines.base import (
    Delta,
    EngineError,
    EngineOverloaded,
    EngineStats,
    SamplingParams,
    token_budget,
)
from serve.engines.cpu_batch import DecodeBatch, Seq

logger = logging.getLogger(__name__)


class CPUEngine:
    """Continuous-batching generation for one Hugging Face causal LM folder on CPU.

    ``max_num_seqs`` caps the sequences decoded together (vLLM's name); ``max_waiting`` caps
    the queue behind them, beyond which :class:`EngineOverloaded` (503 + Retry-After) is
    raised instead of letting latency grow without bound.
    """

    def __init__(self, model_dir: str | Path, *, max_num_seqs: int = 16,
                 max_model_len: int | None = None, max_waiting: int | None = None,
                 num_threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.model_dir = Path(model_dir)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.eval()
        eos: set[int] = set()
        try:
            gen = GenerationConfig.from_pretrained(self.model_dir)
            ids = gen.eos_token_id
            eos.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        except OSError:  # no generation_config.json: the tokenizer's EOS is the contract
            pass
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                             else next(iter(eos), 0))
        cfg = self.model.config
        n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.context_length = int(n_ctx or 2048)
        self.max_model_len = min(self.context_length, max_model_len or self.context_length)
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting if max_waiting is not None else 8 * max_num_seqs
        self._torch = torch
        # Appended by event loops, popped by the step thread (deque's ends are thread-safe).
        self._waiting: collections.deque[Seq] = collections.deque()
        #: The running batch, owned by the step thread.
        self.batch = DecodeBatch(self.model, self.tokenizer, eos_token_ids=eos,
                                 pad_token_id=self.pad_token_id,
                                 max_model_len=self.max_model_len)
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._thread_error: BaseException | None = None
        self._aborted = 0

    # -- public --------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def stats(self) -> EngineStats:
        batch = self.batch
        return EngineStats(running=batch.running, waiting=len(self._waiting),
                           finished=batch.finished, aborted=self._aborted,
                           generated_tokens=batch.generated, steps=batch.steps)

    def check(self, prompt_ids: list[int], params: SamplingParams,
              max_tokens_param: str = "max_tokens") -> int:
        """Refuse what cannot run (400) and return the sequence's token budget."""
        return token_budget(len(prompt_ids), self.max_model_len, params.max_tokens,
                            max_tokens_param)

    def failure(self) -> str | None:
        """Why the step thread is gone, if it died (the replica's health check fails)."""
        if self._thread_error is not None:
            return f"engine loop died: {self._thread_error!r}"
        return None

    def ensure_capacity(self, sequences: int = 1) -> None:
        """Refuse (503 + Retry-After) when the queue cannot take ``sequences`` more."""
        if len(self._waiting) + sequences > self.max_waiting:
            raise EngineOverloaded(f"the engine has {len(self._waiting)} sequences waiting "
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
        gen = self._torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None
                        else int.from_bytes(os.urandom(8), "little") >> 1)
        seq = Seq(request_id=request_id, prompt_ids=list(prompt_ids), params=params,
                  max_tokens=budget, queue=asyncio.Queue(), generator=gen,
                  loop=asyncio.get_running_loop())
        self._ensure_thread()
        self._waiting.append(seq)
        self._wake.set()
        try:
            shown = False  # has a delta with text gone out yet
            while True:
                if shown and coalesce_s > 0 and not seq.ended.is_set():
                    if coalesce_s == float("inf"):
                        await seq.ended.wait()
                    else:
                        try:
                            await asyncio.wait_for(seq.ended.wait(), coalesce_s)
                        except TimeoutError:
                            pass
                delta = await seq.queue.get()
                # A reader slower than the engine gets everything produced since its last
                # read in one delta: streaming never falls behind generation.
                while not isinstance(delta, _Failed) and not seq.queue.empty():
                    nxt = seq.queue.get_nowait()
                    delta = nxt if isinstance(nxt, _Failed) else delta.merge(nxt)
                if isinstance(delta, _Failed):
                    # Not a finish reason: the OpenAI layer reports it as an error (an error
                    # event when the stream has started, else a 500 response).
                    raise EngineError(f"generation failed: {delta.error}", status=500,
                                      type="internal_server_error", code="engine_error")
                shown = shown or bool(delta.text)
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                seq.aborted = True
                self._aborted += 1
                try:
                    self._waiting.remove(seq)
                except ValueError:
                    pass

    async def close(self) -> None:
        self._closed = True
        self._wake.set()

    # -- the iteration loop ------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._closed or self._thread_error is not None:
            why = self.failure() or "the engine is shutting down"
            raise EngineOverloaded(f"{why}; retry on another replica")
        with self._start_lock:  # one step thread, whichever event loop asks first
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cpu-engine",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        _name_os_thread()
        try:
            while not self._closed:
                if not self.batch.rows and not self._waiting:
                    self._wake.clear()
                    if not self._waiting:  # a request added after the clear() sets it again
                        self._wake.wait()
                    continue
                admitted: list[Seq] = []
                while self._waiting and len(self.batch.rows) + len(admitted) < self.max_num_seqs:
                    seq = self._waiting.popleft()
                    if not seq.aborted:
                        admitted.append(seq)
                try:
                    results = self._step(admitted)
                except Exception as err:  # the batch is lost; its sequences get a 500
                    logger.exception("engine step failed")
                    failed = [s for s in self.batch.rows + admitted if not s.finished]
                    self.batch.reset()
                    for s in failed:
                        s.finished = True
                    self._hand_over([(s, _Failed(err)) for s in failed])
                    continue
                self._hand_over(results)
        except BaseException as err:  # a bug in the loop itself: fail the health check
            self._thread_error = err
            logger.exception("engine loop died")
            # and every open request at once, rather than leave its client waiting
            for seq in [s for s in self.batch.rows if not s.finished] + list(self._waiting):
                try:
                    seq.loop.call_soon_threadsafe(_deliver, [(seq, _Failed(err))])
                except RuntimeError:  # that event loop is closed
                    pass
            raise

    def _step(self, admitted: list[Seq]) -> list[tuple[Seq, Delta | None]]:
        """One iteration on the step thread (the batch's own step)."""
        return self.batch.step(admitted)

    def _hand_over(self, results: list[tuple[Seq, Delta | _Failed | None]]) -> None:
        """Give a step's deltas to their requests' event loops, one callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Seq, Delta | _Failed]]] = {}
        for seq, delta in results:
            if delta is not None and not seq.aborted:
                by_loop.setdefault(seq.loop, []).append((seq, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody reads these any more
                for seq, _ in items:
                    seq.aborted = True


@dataclass
class _Failed:
    """Queued for a sequence instead of a delta when its step failed or the loop died;
    ``generate`` raises it as a 500 :class:`EngineError`."""

    error: BaseException


def _deliver(items: list[tuple[Seq, Delta | _Failed]]) -> None:
    """On the request's event loop: queue each delta for its reader."""
    for seq, item in items:
        if not seq.aborted:
            seq.queue.put_nowait(item)
            if isinstance(item, _Failed) or item.finish_reason is not None:
                seq.ended.set()


def _name_os_thread(name: bytes = b"cpu-engine") -> None:
    """Name the step thread in the OS too (Python names it for Python only), so ``top -H``,
    ``ps -L`` and the benchmark's CPU meter tell the model's work from the replica's HTTP and
    Ray threads. Linux's PR_SET_NAME; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name, 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):  # no libc symbols or no prctl (macOS, Windows)
        pass


__all__ = ["CPUEngine", "EngineStats"]
