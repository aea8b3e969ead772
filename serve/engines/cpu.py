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

The loop runs on a thread of its own (``cpu-engine``) that steps back to back while it has
sequences and hands each step's deltas to the event loop of their requests in one callback:
it never waits for the event loop, which may be busy with HTTP, so a replica serving many
streams keeps its model busy (torch releases the GIL inside its ops; the event loop and the
step thread share the rest). Text is detokenized here, with stop strings and incomplete UTF-8
held back, so every yielded :class:`~serve.engines.base.Delta` is final.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from serve.engines.base import Delta, EngineError, EngineOverloaded, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    """One sequence (one OpenAI choice) inside the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    queue: asyncio.Queue
    generator: object  # torch.Generator
    #: The event loop of the request: the step thread hands the deltas over to it.
    loop: asyncio.AbstractEventLoop | None = None
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    # Incremental detokenization (vLLM's scheme): the text of the output so far and the
    # window of ids it was last decoded from, so a step decodes a few tokens, not all.
    text: str = ""
    decode_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    first_token_s: float | None = None
    finished: bool = False
    #: Set when the last delta is queued, so a coalescing reader never waits past the end.
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False


@dataclass
class EngineStats:
    running: int
    waiting: int
    finished: int
    aborted: int
    generated_tokens: int
    steps: int


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
        self._waiting: collections.deque[_Seq] = collections.deque()
        # Batch state, owned by the step thread.
        self._rows: list[_Seq] = []
        self._cache = None
        self._mask = None  # [B, T] 1 = real token, 0 = left padding
        self._pos = None  # [B] position id of the next token
        self._last = None  # [B] last sampled token
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._thread_error: BaseException | None = None
        self._finished = self._aborted = self._generated = self._steps = 0

    # -- public --------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def stats(self) -> EngineStats:
        return EngineStats(running=sum(not s.finished for s in self._rows),
                           waiting=len(self._waiting), finished=self._finished,
                           aborted=self._aborted, generated_tokens=self._generated,
                           steps=self._steps)

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
        seq = _Seq(request_id=request_id, prompt_ids=list(prompt_ids), params=params,
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
                while not isinstance(delta, EngineErrorDelta) and not seq.queue.empty():
                    nxt = seq.queue.get_nowait()
                    delta = nxt if isinstance(nxt, EngineErrorDelta) else delta.merge(nxt)
                if isinstance(delta, EngineErrorDelta):
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
                if not self._rows and not self._waiting:
                    self._wake.clear()
                    if not self._waiting:  # a request added after the clear() sets it again
                        self._wake.wait()
                    continue
                admitted: list[_Seq] = []
                while self._waiting and len(self._rows) + len(admitted) < self.max_num_seqs:
                    seq = self._waiting.popleft()
                    if not seq.aborted:
                        admitted.append(seq)
                try:
                    results = self._step(admitted)
                except Exception as err:  # the batch is lost; its sequences get a 500
                    logger.exception("engine step failed")
                    failed = [s for s in self._rows + admitted if not s.finished]
                    self._reset_batch()
                    for s in failed:
                        s.finished = True
                    self._hand_over([(s, EngineErrorDelta(err)) for s in failed])
                    continue
                self._hand_over(results)
        except BaseException as err:  # a bug in the loop itself: fail the health check
            self._thread_error = err
            logger.exception("engine loop died")
            # and every open request at once, rather than leave its client waiting
            for seq in [s for s in self._rows if not s.finished] + list(self._waiting):
                try:
                    seq.loop.call_soon_threadsafe(_deliver, [(seq, EngineErrorDelta(err))])
                except RuntimeError:  # that event loop is closed
                    pass
            raise

    def _hand_over(self, results: list[tuple[_Seq, Delta | None]]) -> None:
        """Give a step's deltas to their requests' event loops, one callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Seq, Delta]]] = {}
        for seq, delta in results:
            if delta is not None and not seq.aborted:
                by_loop.setdefault(seq.loop, []).append((seq, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody reads these any more
                for seq, _ in items:
                    seq.aborted = True

    def _step(self, admitted: list[_Seq]) -> list[tuple[_Seq, Delta | None]]:
        """One iteration on the worker thread: decode the running batch, prefill the admitted."""
        torch = self._torch
        out: list[tuple[_Seq, Delta | None]] = []
        with torch.inference_mode():
            self._drop([i for i, s in enumerate(self._rows) if s.finished or s.aborted])
            if self._rows:
                attn = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
                logits = self.model(input_ids=self._last[:, None], attention_mask=attn,
                                    position_ids=self._pos[:, None],
                                    past_key_values=self._cache, use_cache=True).logits[:, -1]
                self._mask = attn
                self._pos = self._pos + 1
                tokens = self._sample(logits, self._rows)
                self._last = torch.tensor(tokens)
                out += [(s, self._advance(s, t)) for s, t in zip(self._rows, tokens)]
            if admitted:
                cache, mask, pos, logits = self._prefill(admitted)
                tokens = self._sample(logits, admitted)
                out += [(s, self._advance(s, t)) for s, t in zip(admitted, tokens)]
                self._merge(cache, mask, pos, torch.tensor(tokens), admitted)
            self._drop([i for i, s in enumerate(self._rows) if s.finished or s.aborted])
            self._steps += 1
        return out

    # -- batch state ---------------------------------------------------------------------

    def _prefill(self, seqs: list[_Seq]):
        torch = self._torch
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s.prompt_ids)
            ids[i, width - n:] = torch.tensor(s.prompt_ids)
            mask[i, width - n:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                            past_key_values=cache, use_cache=True).logits[:, -1]
        return cache, mask, mask.sum(-1), logits

    def _merge(self, cache, mask, pos, last, seqs: list[_Seq]) -> None:
        torch = self._torch
        if not self._rows:
            self._cache, self._mask, self._pos, self._last = cache, mask, pos, last
            self._rows = list(seqs)
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t, dim: int):
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)], dim=0)
            old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)], dim=0)
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)], dim=0)
        self._pos = torch.cat([self._pos, pos])
        self._last = torch.cat([self._last, last])
        self._rows += seqs

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        torch = self._torch
        keep = [i for i in range(len(self._rows)) if i not in set(rows)]
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep)
        mask = self._mask[index]
        # Columns that are padding in every remaining row are dead weight: trim them.
        start = int((mask.sum(0) > 0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._mask = mask[:, start:]
        self._pos = self._pos[index]
        self._last = self._last[index]
        self._rows = [self._rows[i] for i in keep]

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None

    # -- sampling and detokenization -------------------------------------------------------

    def _detokenize(self, s: _Seq, token: int) -> None:
        """Append ``token``'s text to ``s.text``, decoding only a short window: the last few
        prompt tokens give the first output token its context (a leading space), and a token
        that ends inside a UTF-8 character waits for the rest."""
        if not s.decode_ids:
            context = s.prompt_ids[-4:]
            s.decode_ids = list(context)
            s.prefix_offset, s.read_offset = 0, len(context)
        s.decode_ids.append(token)
        decode = self.tokenizer.decode
        before = decode(s.decode_ids[s.prefix_offset:s.read_offset], skip_special_tokens=True)
        after = decode(s.decode_ids[s.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            s.text += after[len(before):]
            s.prefix_offset, s.read_offset = s.read_offset, len(s.decode_ids)

    def _sample(self, logits, seqs: list[_Seq]) -> list[int]:
        torch = self._torch
        logits = logits.float()
        tokens = logits.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            p = s.params
            if p.greedy:
                continue
            row = logits[i] / p.temperature
            if p.top_p < 1.0:
                sorted_logits, order = row.sort(descending=True)
                probs = sorted_logits.softmax(-1)
                # keep the smallest prefix whose mass reaches top_p (always the top token)
                drop = (probs.cumsum(-1) - probs) > p.top_p
                sorted_logits[drop] = float("-inf")
                row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
            tokens[i] = int(torch.multinomial(row.softmax(-1), 1, generator=s.generator))
        return tokens

    def _advance(self, s: _Seq, token: int) -> Delta:
        s.output_ids.append(token)
        self._generated += 1
        if s.first_token_s is None:
            s.first_token_s = time.perf_counter() - s.arrival
        finish = None
        if token in self.eos_token_ids and not s.params.ignore_eos:
            finish = "stop"
        else:
            self._detokenize(s, token)
        text = s.text
        if finish is None and s.params.stop:
            # Only text after what was already sent can hold a new stop string.
            hits = [k for k in (text.find(stop, max(0, s.sent_chars - len(stop) + 1))
                                for stop in s.params.stop) if k >= 0]
            if hits:
                text = text[:min(hits)]
                finish = "stop"
        if finish is None and (len(s.output_ids) >= s.max_tokens
                               or len(s.prompt_ids) + len(s.output_ids) >= self.max_model_len):
            finish = "length"
        upto = len(text)
        if finish is None:
            upto -= _held_for_stop(text, s.params.stop)
        new_text = text[s.sent_chars:upto] if upto > s.sent_chars else ""
        s.sent_chars = max(s.sent_chars, upto)
        if finish is not None:
            s.finished = True
            self._finished += 1
        return Delta(text=new_text, token_ids=[token], finish_reason=finish,
                     prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.output_ids),
                     first_token_s=s.first_token_s if len(s.output_ids) == 1 else None)


def _deliver(items: list[tuple[_Seq, Delta]]) -> None:
    """On the request's event loop: queue each delta for its reader."""
    for seq, delta in items:
        if not seq.aborted:
            seq.queue.put_nowait(delta)
            if delta.finish_reason is not None:
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


def _held_for_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


class EngineErrorDelta(Delta):
    """Put on a sequence's queue when its step failed; ``generate`` raises it as a 500."""

    def __init__(self, err: Exception):
        super().__init__(finish_reason="error")
        self.error = err


__all__ = ["CPUEngine", "EngineStats"]
