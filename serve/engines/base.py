"""The engine interface: sampling parameters in, token deltas out, and what the layers above
may ask of an engine (:class:`Engine`).

The OpenAI layer (serve/serving.py) turns a request into a prompt and :class:`SamplingParams`;
an engine generates and yields :class:`Delta` objects whose ``text`` is final (stop strings
and incomplete UTF-8 already held back), so the layer above never re-decodes.

Two serving stacks, one contract. The CPU path is rayplane's own: ``CPUEngine``
(serve/engines/cpu.py) implements :class:`Engine`, ``OpenAIServing`` turns it into OpenAI
responses, and the model deployment (serve/model_server.py) reports its ``stats()`` and
``failure()``. The vLLM path (serve/engines/vllm.py) runs Ray's own ``LLMServer`` deployments
behind Ray's ``OpenAiIngress`` instead, and is measured against the same duties:

- ``generate`` (and the OpenAI layer above it): ``LLMServer.chat`` / ``completions`` hand the
  request to vLLM's OpenAI serving, which renders the chat template, samples and streams
  (batched every ``stream_batching_interval_ms``, as ``coalesce_s`` batches here);
- ``tokenizer`` / ``has_chat_template`` / ``max_model_len`` / ``check``: vLLM's own
  tokenizer and model config, with the same 400 for a prompt past the context;
- ``ensure_capacity``: Serve's ``max_ongoing_requests`` / ``max_queued_requests`` (rendered
  from the serve config) and vLLM's scheduler queue;
- aborting (closing the ``generate`` stream): vLLM aborts a request whose client went away;
- ``failure``: ``LLMServer.check_health`` (the replica's health check) asks vLLM's engine;
- ``stats``: vLLM's Prometheus metrics (``vllm:num_requests_running`` and so on) take the
  place of :class:`EngineStats`.

What rayplane adds in front of ``LLMServer`` is the same as on the CPU path: API keys
(serve/auth.py) and OpenAI's error body (``serve.protocol.error_body``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from serve.protocol import error_body


class EngineError(Exception):
    """A request the engine cannot take, in OpenAI's error terms (status, type, param, code).

    Plain attributes only, so it pickles across Ray (a replica raises it, the ingress maps it
    to the HTTP response)."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __reduce__(self):
        return (_rebuild_engine_error, (type(self), self.message, self.status, self.type,
                                        self.param, self.code, self.retry_after))

    def body(self) -> dict:
        """OpenAI's error body (``serve.protocol.error_body``)."""
        return error_body(self.message, self.type, self.param, self.code)


def _rebuild_engine_error(cls, message, status, type_, param, code, retry_after):
    return cls(message, status=status, type=type_, param=param, code=code,
               retry_after=retry_after)


class EngineOverloaded(EngineError):
    """The engine's queue is full: 503 with Retry-After, the client should retry."""

    def __init__(self, message: str, retry_after: float = 1.0, **kw):
        kw.setdefault("status", 503)
        kw.setdefault("type", "service_unavailable")
        kw.setdefault("code", "overloaded")
        super().__init__(message, retry_after=retry_after, **kw)


@dataclass
class SamplingParams:
    """How one sequence is sampled (one OpenAI choice)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class Delta:
    """New output of one sequence since the last delta."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    #: New tokens when the engine counts them without their ids (a server that streams text,
    #: as Triton's vLLM backend does); None: ``len(token_ids)``.
    token_count: int | None = None
    #: Set on a sequence's last delta. An engine only ever ends one with "stop" (EOS or a
    #: stop string) or "length"; a failure is raised as :class:`EngineError` instead.
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far (EOS included, as vLLM counts it)
    #: Seconds since the request entered the engine when its first token was produced.
    first_token_s: float | None = None

    @property
    def new_tokens(self) -> int:
        return self.token_count if self.token_count is not None else len(self.token_ids)

    def merge(self, later: Delta) -> Delta:
        """Two deltas as one (a slow reader gets several tokens in one chunk)."""
        counted = self.token_count is not None or later.token_count is not None
        return Delta(text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                     token_count=self.new_tokens + later.new_tokens if counted else None,
                     finish_reason=later.finish_reason, prompt_tokens=later.prompt_tokens,
                     completion_tokens=later.completion_tokens,
                     first_token_s=self.first_token_s if self.first_token_s is not None
                     else later.first_token_s)


def token_budget(n_prompt: int, max_model_len: int, max_tokens: int | None,
                 max_tokens_param: str = "max_tokens") -> int:
    """The tokens a sequence may generate, or the 400 of a prompt that leaves no room or a
    ``max_tokens`` past the context (vLLM's and OpenAI's wording)."""
    if n_prompt == 0:
        raise EngineError("the prompt is empty", param="prompt")
    if n_prompt >= max_model_len:
        raise EngineError(
            f"This model's maximum context length is {max_model_len} tokens; the "
            f"prompt has {n_prompt} tokens, leaving no room to generate", param="messages",
            code="context_length_exceeded")
    room = max_model_len - n_prompt
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise EngineError(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the "
            "messages or completion.", param=max_tokens_param,
            code="context_length_exceeded")
    return max_tokens


@dataclass
class EngineStats:
    """An engine's counters (the model deployment's ``/healthz`` entry)."""

    running: int
    waiting: int
    finished: int
    aborted: int
    generated_tokens: int
    steps: int


@runtime_checkable
class Engine(Protocol):
    """What ``OpenAIServing`` and the model deployment use of an engine, and nothing more.

    A request is refused before it starts (``check``, ``ensure_capacity``: an
    :class:`EngineError` with OpenAI's status), then ``generate`` streams its deltas. Closing
    the ``generate`` stream early aborts the sequence: the engine frees its slot at once. A
    failure after the stream started is raised from ``generate`` as an :class:`EngineError`
    (status 500), which the OpenAI layer sends as an error event inside the stream."""

    #: The model's ``transformers`` tokenizer (``apply_chat_template``, ``encode``,
    #: ``decode``, ``len``).
    tokenizer: Any
    #: Longest prompt + completion served, in tokens.
    max_model_len: int

    @property
    def has_chat_template(self) -> bool: ...

    def check(self, prompt_ids: list[int], params: SamplingParams,
              max_tokens_param: str = "max_tokens") -> int:
        """Refuse what cannot run (400, naming ``max_tokens_param``); the token budget."""

    def ensure_capacity(self, sequences: int = 1) -> None:
        """Refuse (503 + Retry-After) when ``sequences`` more cannot be queued."""

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "",
                 *, max_tokens: int | None = None,
                 coalesce_s: float = 0.0) -> AsyncIterator[Delta]:
        """Deltas of one sequence until its ``finish_reason``; at most one per
        ``coalesce_s`` after the first visible text (``inf``: the rest at the end)."""

    def stats(self) -> EngineStats: ...

    def failure(self) -> str | None:
        """Why the engine cannot serve any more (the replica's health check fails), or None."""

    async def close(self) -> None: ...


__all__ = ["Delta", "Engine", "EngineError", "EngineOverloaded", "EngineStats",
           "SamplingParams", "token_budget"]
