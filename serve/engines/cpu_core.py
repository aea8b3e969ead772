"""The CPU engine's core: the model, the running batch and the step loop, in a process of
its own.

:class:`EngineCore` does the model's work (the iteration scheme vLLM and TGI use, here on
``transformers``' own model and ``DynamicCache``):

- every step admits waiting sequences up to ``max_num_seqs`` running ones, prefills them
  together (left-padded, one forward pass) and merges their KV cache into the running batch
  (left-padding the shorter of the two), so a request joins at the next token boundary
  instead of waiting for the batch to drain;
- one decode forward pass then produces the next token of every running sequence, each
  sampled with its own temperature / top_p / seed;
- finished and aborted sequences leave the batch at once (their KV rows are dropped and the
  all-padding columns trimmed), so a client that disconnects frees its slot.

Text is detokenized here, with stop strings and incomplete UTF-8 held back, so every
:class:`~serve.engines.base.Delta` that leaves the core is final.

Why a process of its own (``python -m serve.engines.cpu_core``, driven by
:class:`serve.engines.cpu.CPUEngine` over a socket pair): a small model's forward pass is
mostly Python (module calls, op dispatch) and holds the GIL for most of its time, so in the
replica's process it competes with everything else there -- HTTP, JSON, Ray's own threads --
and a decode step took twice as long under 16 streaming clients as alone. vLLM's V1 engine
splits its engine core from the API server for the same reason. Messages are one per step
(all sequences' deltas together), so the split costs a pickle per step, not per token.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve.engines.base import Delta, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    """One sequence (one OpenAI choice) inside the core."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    #: ``time.perf_counter()`` when the request reached the engine (CLOCK_MONOTONIC on
    #: Linux: the same clock in the front's process and here).
    arrival: float = field(default_factory=time.perf_counter)
    generator: object = None  # torch.Generator, seeded by the core
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
    aborted: bool = False


@dataclass
class CoreStats:
    running: int = 0
    waiting: int = 0
    finished: int = 0
    generated_tokens: int = 0
    steps: int = 0


class EngineCore:
    """One Hugging Face causal LM folder on CPU and its running batch. Not thread-safe: one
    caller drives :meth:`step` (the core process's loop, or a benchmark directly)."""

    def __init__(self, model_dir: str | Path, *, max_num_seqs: int = 16,
                 max_model_len: int | None = None, num_threads: int | None = None):
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
        self._torch = torch
        self._rows: list[_Seq] = []
        self._cache = None
        self._mask = None  # [B, T] 1 = real token, 0 = left padding
        self._pos = None  # [B] position id of the next token
        self._last = None  # [B] last sampled token
        self.stats = CoreStats()

    def info(self) -> dict:
        """What the front needs to check requests without the model."""
        return {"context_length": self.context_length, "max_model_len": self.max_model_len,
                "eos_token_ids": sorted(self.eos_token_ids), "pad_token_id": self.pad_token_id}

    def new_seq(self, seq_id: int, prompt_ids: list[int], params: SamplingParams,
                max_tokens: int, arrival: float | None = None) -> _Seq:
        gen = self._torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None
                        else int.from_bytes(os.urandom(8), "little") >> 1)
        return _Seq(seq_id=seq_id, prompt_ids=list(prompt_ids), params=params,
                    max_tokens=max_tokens, generator=gen,
                    arrival=arrival if arrival is not None else time.perf_counter())

    @property
    def running(self) -> int:
        return sum(not s.finished and not s.aborted for s in self._rows)

    def step(self, admitted: list[_Seq]) -> list[tuple[_Seq, Delta]]:
        """One iteration: decode the running batch, prefill the admitted."""
        torch = self._torch
        out: list[tuple[_Seq, Delta]] = []
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
            self.stats.steps += 1
        return out

    def reset(self) -> list[_Seq]:
        """Drop the running batch (after a failed step); returns its unfinished sequences."""
        left = [s for s in self._rows if not s.finished]
        self._reset_batch()
        return left

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
        self.stats.generated_tokens += 1
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
            self.stats.finished += 1
        return Delta(text=new_text, token_ids=[token], finish_reason=finish,
                     prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.output_ids),
                     first_token_s=s.first_token_s if len(s.output_ids) == 1 else None)


def _held_for_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


# -- the core process ------------------------------------------------------------------------
#
# Messages (pickled tuples over a socket pair, one ``multiprocessing.connection`` frame each):
#   front -> core: ("add", seq_id, prompt_ids, SamplingParams, max_tokens, arrival)
#                  ("abort", seq_id)      ("close",)
#   core -> front: ("ready", info) or ("failed", message), once, first
#                  ("step", [(seq_id, Delta), ...], CoreStats)   after every step
#                  ("error", [seq_id, ...], message, CoreStats)  a step failed


def serve(core: EngineCore, conn) -> None:
    """Step while there is work; take messages between steps, block when idle. Returns when
    the front says close or goes away (its end of the socket closes with its process)."""
    waiting: collections.deque[_Seq] = collections.deque()
    live: dict[int, _Seq] = {}  # waiting or running, by seq_id
    while True:
        try:
            idle = not core._rows and not waiting
            while idle or conn.poll():
                msg = conn.recv()
                idle = False
                if msg[0] == "add":
                    seq = core.new_seq(*msg[1:])
                    waiting.append(seq)
                    live[seq.seq_id] = seq
                elif msg[0] == "abort":
                    seq = live.pop(msg[1], None)
                    if seq is not None:
                        seq.aborted = True
                elif msg[0] == "close":
                    return
            admitted: list[_Seq] = []
            while waiting and core.running + len(admitted) < core.max_num_seqs:
                seq = waiting.popleft()
                if not seq.aborted:
                    admitted.append(seq)
            core.stats.waiting = sum(not s.aborted for s in waiting)
            try:
                results = core.step(admitted)
            except Exception as err:  # the batch is lost; its sequences get a 500
                logger.exception("engine step failed")
                failed = core.reset() + [s for s in admitted if not s.finished]
                for s in failed:
                    live.pop(s.seq_id, None)
                core.stats.running = 0
                conn.send(("error", [s.seq_id for s in failed], f"{type(err).__name__}: {err}",
                           core.stats))
                continue
            for seq, delta in results:
                if delta.finish_reason is not None:
                    live.pop(seq.seq_id, None)
            core.stats.running = core.running
            conn.send(("step", [(s.seq_id, d) for s, d in results if not s.aborted],
                       core.stats))
        except (EOFError, OSError):  # the front's process is gone: so is our work
            return


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    fd, options = int(argv[0]), json.loads(argv[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cpu-engine-core %(message)s")
    conn = Connection(fd)
    try:
        core = EngineCore(options.pop("model_dir"), **options)
    except Exception as err:
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return 1
    conn.send(("ready", core.info()))
    serve(core, conn)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: what the core pickles must
    # name serve.engines.cpu_core's classes, which the front can import.
    from serve.engines.cpu_core import main as _main

    sys.exit(_main(sys.argv[1:]))
