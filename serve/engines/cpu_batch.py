"""The CPU engine's running batch: the sequences decoded together and their KV cache, owned by
the engine's step thread (serve/engines/cpu.py), which calls :meth:`DecodeBatch.step` back to
back while there is work.

A step decodes one token of every running sequence (one forward pass over the batch), then
prefills the sequences admitted since the last step (left-padded, one forward pass) and merges
their KV cache into the batch (left-padding the shorter of the two), so a request joins at the
next token boundary. Finished and aborted sequences leave at the start and end of a step: their
KV rows are dropped and the columns that are padding in every remaining row trimmed. Each new
token is sampled with its sequence's own temperature / top_p / seed, detokenized incrementally
(vLLM's scheme) and checked against the stop strings, so the delta it yields is final.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from serve.engines.base import Delta, SamplingParams


@dataclass(eq=False)
class Seq:
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


class DecodeBatch:
    """The batch state of one engine: which sequences run, and their tensors (KV cache,
    attention mask with left padding, next position ids, last sampled tokens)."""

    def __init__(self, model, tokenizer, *, eos_token_ids: set[int], pad_token_id: int,
                 max_model_len: int):
        import torch

        self.torch = torch
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids, self.pad_token_id = eos_token_ids, pad_token_id
        self.max_model_len = max_model_len
        self.rows: list[Seq] = []
        self._cache = None
        self._mask = None  # [B, T] 1 = real token, 0 = left padding
        self._pos = None  # [B] position id of the next token
        self._last = None  # [B] last sampled token
        #: Counters since the engine started (its stats).
        self.finished = self.generated = self.steps = 0

    @property
    def running(self) -> int:
        return sum(not s.finished for s in self.rows)

    def step(self, admitted: list[Seq]) -> list[tuple[Seq, Delta | None]]:
        """One iteration: decode the running batch, prefill and merge the admitted."""
        torch = self.torch
        out: list[tuple[Seq, Delta | None]] = []
        with torch.inference_mode():
            self._drop([i for i, s in enumerate(self.rows) if s.finished or s.aborted])
            if self.rows:
                attn = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
                logits = self.model(input_ids=self._last[:, None], attention_mask=attn,
                                    position_ids=self._pos[:, None],
                                    past_key_values=self._cache, use_cache=True).logits[:, -1]
                self._mask = attn
                self._pos = self._pos + 1
                tokens = self._sample(logits, self.rows)
                self._last = torch.tensor(tokens)
                out += [(s, self._advance(s, t)) for s, t in zip(self.rows, tokens)]
            if admitted:
                cache, mask, pos, logits = self._prefill(admitted)
                tokens = self._sample(logits, admitted)
                out += [(s, self._advance(s, t)) for s, t in zip(admitted, tokens)]
                self._merge(cache, mask, pos, torch.tensor(tokens), admitted)
            self._drop([i for i, s in enumerate(self.rows) if s.finished or s.aborted])
            self.steps += 1
        return out

    def _prefill(self, seqs: list[Seq]):
        torch = self.torch
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

    def _merge(self, cache, mask, pos, last, seqs: list[Seq]) -> None:
        torch = self.torch
        if not self.rows:
            self._cache, self._mask, self._pos, self._last = cache, mask, pos, last
            self.rows = list(seqs)
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
        self.rows += seqs

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        torch = self.torch
        keep = [i for i in range(len(self.rows)) if i not in set(rows)]
        if not keep:
            self.reset()
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
        self.rows = [self.rows[i] for i in keep]

    def reset(self) -> None:
        self.rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None

    # -- sampling and detokenization -------------------------------------------------------

    def _detokenize(self, s: Seq, token: int) -> None:
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

    def _sample(self, logits, seqs: list[Seq]) -> list[int]:
        torch = self.torch
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

    def _advance(self, s: Seq, token: int) -> Delta:
        s.output_ids.append(token)
        self.generated += 1
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
            upto -= held_for_stop(text, s.params.stop)
        new_text = text[s.sent_chars:upto] if upto > s.sent_chars else ""
        s.sent_chars = max(s.sent_chars, upto)
        if finish is not None:
            s.finished = True
            self.finished += 1
        return Delta(text=new_text, token_ids=[token], finish_reason=finish,
                     prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.output_ids),
                     first_token_s=s.first_token_s if len(s.output_ids) == 1 else None)


def held_for_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


__all__ = ["DecodeBatch", "Seq", "held_for_stop"]
