"""The OpenAI serving logic over an engine: requests become prompts and sampling parameters,
engine deltas become OpenAI responses and server-sent events (vLLM's ``serving_chat.py`` /
``serving_completion.py`` split, one class here).

It works over any :class:`~serve.engines.base.Engine` and runs inside the model's Serve replica
(next to the engine, so tokens never cross a process boundary one by one). Every failure a
client can cause is an :class:`~serve.engines.base.EngineError` with OpenAI's status and body;
a failure after a stream started is an error event in that body's shape followed by
``[DONE]``, and every choice ends with one of OpenAI's documented finish reasons.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve.engines.base import Delta, Engine, EngineError, SamplingParams
from serve.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    NamedToolChoice,
    SamplingFields,
    Usage,
    completion_id,
    sse,
)
from serve.tools import ToolStreamFilter, forced_prefix

logger = logging.getLogger(__name__)


class Observer(Protocol):
    """Where per-request timings go (serve/metrics.py records them in Prometheus)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, prompt_tokens: int, completion_tokens: int, seconds: float,
                 first_token_s: float | None) -> None: ...


@dataclass
class _Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    first_token_s: float | None = None


@dataclass
class _Prepared:
    prompts: list[list[int]]  # one per prompt (chat: one)
    params: list[SamplingParams]  # one per choice of a prompt
    budgets: list[int]  # token budget per prompt
    prefix: str = ""
    tools_enabled: bool = False
    declared: set[str] = field(default_factory=set)
    echo: list[str] = field(default_factory=list)


class OpenAIServing:
    """Chat and text completions for one served model on one engine."""

    def __init__(self, engine: Engine, model_name: str, *, root: str | None = None,
                 observer: Observer | None = None, stream_interval_s: float = 0.0,
                 engine_kind: str = "cpu"):
        self.engine = engine
        self.engine_kind = engine_kind
        #: A stream's tokens after the first are sent at most this often (engine coalescing).
        self.stream_interval_s = stream_interval_s
        self.model_name = model_name
        self.root = root
        self.observer = observer

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, root=self.root,
                         max_model_len=self.engine.max_model_len, engine=self.engine_kind)

    # -- request -> prompts and sampling parameters ----------------------------------------

    def _params(self, req: SamplingFields, n: int) -> list[SamplingParams]:
        temperature = 1.0 if req.temperature is None else req.temperature
        return [SamplingParams(max_tokens=None, temperature=temperature,
                               top_p=1.0 if req.top_p is None else req.top_p,
                               seed=None if req.seed is None else req.seed + i,
                               stop=req.stop_list, ignore_eos=req.ignore_eos)
                for i in range(n)]

    def _ensure_capacity(self, sequences: int, param: str) -> None:
        """A request larger than the engine's whole queue is the client's to fix (400); one
        that only finds the queue full now may retry (503, ``ensure_capacity``)."""
        most = getattr(self.engine, "max_waiting", None)
        if most is not None and sequences > most:
            raise EngineError(f"this request asks for {sequences} sequences (choices x "
                              f"prompts); the model queues at most {most} at once", param=param)
        self.engine.ensure_capacity(sequences)

    def prepare_chat(self, req: ChatCompletionRequest) -> _Prepared:
        tok = self.engine.tokenizer
        if not self.engine.has_chat_template:
            raise EngineError(f"model {self.model_name!r} has no chat template in its folder; "
                              "use /v1/completions", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            try:
                msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                       "content": _unicode(m.text())}
            except ValueError as err:
                raise EngineError(str(err), param=f"messages[{i}].content") from None
            if m.tool_calls:
                calls = []
                for j, c in enumerate(m.tool_calls):
                    try:
                        args = json.loads(c.function.arguments or "{}")
                    except json.JSONDecodeError:
                        raise EngineError("arguments must be a JSON object string",
                                          param=f"messages[{i}].tool_calls[{j}].function."
                                                "arguments") from None
                    calls.append({"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": args}})
                msg["tool_calls"] = calls
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        enabled = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if enabled else None
        try:
            ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        except Exception as err:  # noqa: BLE001 - jinja errors on the client's messages
            raise EngineError(f"the model's chat template cannot render these messages: "
                              f"{err}", param="messages") from None
        prefix = forced_prefix(req.tool_choice, req.tools) if enabled else ""
        if prefix:
            ids = list(ids) + tok.encode(prefix, add_special_tokens=False)
        params = self._params(req, req.n)
        for p in params:
            p.max_tokens = req.token_limit
        limit_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        budget = self.engine.check(list(ids), params[0], limit_param)
        self._ensure_capacity(len(params), "n")
        declared = {t.function.name for t in req.tools or []}
        if isinstance(req.tool_choice, NamedToolChoice):
            declared = {req.tool_choice.function.name}
        return _Prepared(prompts=[list(ids)], params=params, budgets=[budget], prefix=prefix,
                         tools_enabled=enabled, declared=declared)

    def prepare_completion(self, req: CompletionRequest) -> _Prepared:
        tok = self.engine.tokenizer
        prompts, echo = [], []
        vocab = len(tok)
        for i, p in enumerate(req.prompts):
            if isinstance(p, str):
                try:
                    ids = tok.encode(_unicode(p))
                except ValueError as err:
                    raise EngineError(str(err), param=f"prompt[{i}]") from None
                echo.append(p)
            else:
                if any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                    raise EngineError(f"token ids must lie in [0, {vocab})",
                                      param=f"prompt[{i}]")
                ids = list(p)
                echo.append(tok.decode(ids))
            prompts.append(ids)
        params = self._params(req, req.n)
        for p in params:
            p.max_tokens = req.max_tokens
        budgets = [self.engine.check(ids, params[0], "max_tokens") for ids in prompts]
        self._ensure_capacity(len(params) * len(prompts), "n")
        return _Prepared(prompts=prompts, params=params, budgets=budgets, echo=echo)

    # -- running ---------------------------------------------------------------------------

    async def _stream_choice(self, prompt: list[int], params: SamplingParams, budget: int,
                             request_id: str, coalesce_s: float) -> AsyncIterator[Delta]:
        """Engine deltas of one choice, with timings reported to the observer."""
        start = time.perf_counter()
        last = None
        done: Delta | None = None
        stream = self.engine.generate(prompt, params, request_id, max_tokens=budget,
                                      coalesce_s=coalesce_s)
        try:
            async for d in stream:
                now = time.perf_counter()
                if self.observer is not None and d.new_tokens:
                    if last is None:
                        self.observer.first_token(now - start)
                    else:
                        self.observer.inter_token((now - last) / d.new_tokens)
                last = now
                done = d
                yield d
        finally:
            await stream.aclose()
            if self.observer is not None and done is not None and done.finish_reason:
                self.observer.finished(done.prompt_tokens, done.completion_tokens,
                                       time.perf_counter() - start, done.first_token_s)

    async def _run_all(self, prep: _Prepared, request_id: str) -> list[_Choice]:
        n = len(prep.params)

        async def one(index: int, prompt: list[int], params: SamplingParams, budget: int):
            ch = _Choice(index=index, prompt_tokens=len(prompt))
            # Nothing is sent before the end: the reader wakes for the first token (for
            # TTFT) and then once more, not once per token.
            async for d in self._stream_choice(prompt, params, budget, request_id,
                                               float("inf")):
                ch.text += d.text
                ch.finish_reason = d.finish_reason
                ch.completion_tokens = d.completion_tokens
            return ch

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(one(pi * n + j, prompt, params, prep.budgets[pi]))
                         for pi, prompt in enumerate(prep.prompts)
                         for j, params in enumerate(prep.params)]
        except* EngineError as group:
            # The request fails as its first failed choice does (its OpenAI status and body),
            # not as a group of failures no client knows.
            raise group.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _merged(self, prep: _Prepared, request_id: str
                      ) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas of every choice as they come, tagged with the choice index."""
        n = len(prep.params)
        jobs = [(pi * n + j, prompt, params, prep.budgets[pi])
                for pi, prompt in enumerate(prep.prompts) for j, params in enumerate(prep.params)]
        if len(jobs) == 1:
            index, prompt, params, budget = jobs[0]
            async for d in self._stream_choice(prompt, params, budget, request_id,
                                               self.stream_interval_s):
                yield index, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, prompt, params, budget):
            try:
                async for d in self._stream_choice(prompt, params, budget, request_id,
                                                   self.stream_interval_s):
                    await queue.put((index, d))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer below
                await queue.put((index, err))

        tasks = [asyncio.ensure_future(pump(*job)) for job in jobs]
        try:
            finished = 0
            while finished < len(jobs):
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    finished += 1
                yield index, item
        finally:
            for t in tasks:
                t.cancel()

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request_id: str = "") -> dict:
        prep = self.prepare_chat(req)
        choices = await self._run_all(prep, request_id)
        out = []
        for ch in choices:
            filt = ToolStreamFilter(prep.tools_enabled, prep.declared, prep.prefix)
            filt.feed(ch.text)
            filt.sent = len(prep.prefix)  # non-streamed: the whole content is "not yet sent"
            content, calls = filt.finish()
            message: dict[str, Any] = {"role": "assistant", "content": content}
            finish = ch.finish_reason
            if calls:
                message["content"] = content or None
                message["tool_calls"] = calls
                finish = "tool_calls"
            out.append({"index": ch.index, "message": message, "logprobs": None,
                        "finish_reason": finish})
        usage = Usage.of(len(prep.prompts[0]), sum(c.completion_tokens for c in choices))
        return {"id": completion_id("chat"), "object": "chat.completion",
                "created": int(time.time()), "model": self.model_name, "choices": out,
                "usage": usage.model_dump()}

    async def chat_stream(self, req: ChatCompletionRequest, request_id: str = ""
                          ) -> AsyncIterator[str]:
        """Server-sent events; everything that can be refused is refused before the first.

        One yielded string may hold several events. Every write of a stream costs the same
        whatever it carries (an ASGI message crossing to Serve's event loop, a socket write,
        HAProxy, the client's parse and, in ``router`` mode, one item of the handle's stream
        between two processes), and an event that brings no new text (the role chunk, a finish
        chunk, the usage chunk, ``[DONE]``) tells the reader nothing it must see before the
        next text: it goes out with that text or with the end. A 64-token stream at 16 clients
        takes about 7 writes instead of 10. Text is never held, and the ingress still turns a
        failure before the first write into an HTTP error."""
        prep = self.prepare_chat(req)
        cid, created = completion_id("chat"), int(time.time())
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(index: int, delta: dict, finish: str | None = None) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name,
                        "choices": [{"index": index, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}], **usage_field})

        n = len(prep.params)
        filters = {i: ToolStreamFilter(prep.tools_enabled, prep.declared, prep.prefix)
                   for i in range(n)}
        tokens = dict.fromkeys(range(n), 0)
        # Events without new text ride with the next write (see the docstring): the role
        # chunks with the first text, a choice's finish chunk with the usage chunk and [DONE].
        held = "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(n))
        try:
            async for index, d in self._merged(prep, request_id):
                tokens[index] = d.completion_tokens
                text = filters[index].feed(d.text)
                if d.finish_reason is None:
                    if text:
                        yield held + chunk(index, {"content": text})
                        held = ""
                    continue
                rest, calls = filters[index].finish()
                text += rest
                finish = "tool_calls" if calls else d.finish_reason
                delta: dict[str, Any] = {"content": text} if text else {}
                if calls:
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                held += chunk(index, delta, finish)
        except EngineError as err:
            yield held + sse(err.body()) + SSE_DONE
            return
        if req.include_usage:
            usage = Usage.of(len(prep.prompts[0]), sum(tokens.values()))
            held += sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                         "model": self.model_name, "choices": [], "usage": usage.model_dump()})
        yield held + SSE_DONE

    # -- text completions ------------------------------------------------------------------

    async def completion(self, req: CompletionRequest, request_id: str = "") -> dict:
        prep = self.prepare_completion(req)
        choices = await self._run_all(prep, request_id)
        n = len(prep.params)
        out = [{"index": ch.index,
                "text": (prep.echo[ch.index // n] if req.echo else "") + ch.text,
                "logprobs": None, "finish_reason": ch.finish_reason} for ch in choices]
        usage = Usage.of(sum(len(p) for p in prep.prompts),
                         sum(c.completion_tokens for c in choices))
        return {"id": completion_id("completion"), "object": "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": out,
                "usage": usage.model_dump()}

    async def completion_stream(self, req: CompletionRequest, request_id: str = ""
                                ) -> AsyncIterator[str]:
        prep = self.prepare_completion(req)
        cid, created = completion_id("completion"), int(time.time())
        usage_field = {"usage": None} if req.include_usage else {}
        n = len(prep.params)

        def chunk(index: int, text: str, finish: str | None = None) -> str:
            return sse({"id": cid, "object": "text_completion", "created": created,
                        "model": self.model_name,
                        "choices": [{"index": index, "text": text, "logprobs": None,
                                     "finish_reason": finish}], **usage_field})

        tokens: dict[int, int] = {}
        started: set[int] = set()
        held = ""  # a choice's finish chunk rides with the next write (see chat_stream)
        try:
            async for index, d in self._merged(prep, request_id):
                tokens[index] = d.completion_tokens
                text = d.text
                if req.echo and index not in started:
                    text = prep.echo[index // n] + text
                started.add(index)
                if d.finish_reason is not None:
                    held += chunk(index, text, d.finish_reason)
                elif text:
                    yield held + chunk(index, text)
                    held = ""
        except EngineError as err:
            yield held + sse(err.body()) + SSE_DONE
            return
        if req.include_usage:
            usage = Usage.of(sum(len(p) for p in prep.prompts), sum(tokens.values()))
            held += sse({"id": cid, "object": "text_completion", "created": created,
                         "model": self.model_name, "choices": [], "usage": usage.model_dump()})
        yield held + SSE_DONE


def _unicode(text: str) -> str:
    """``text``, refused (ValueError) when no tokenizer can take it: a lone surrogate, which
    JSON's ``\\ud800`` can carry but UTF-8 cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (a lone surrogate such as \\ud800 "
                         "cannot be tokenized)") from None
    return text


__all__ = ["OpenAIServing", "Observer"]
