"""What every engine takes and yields: sampling parameters in, token deltas out.

The OpenAI layer (serve/serving.py) turns a request into a prompt and :class:`SamplingParams`;
an engine generates and yields :class:`Delta` objects whose ``text`` is final (stop strings
and incomplete UTF-8 already held back), so the layer above never re-decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


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
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far (EOS included, as vLLM counts it)
    #: Seconds since the request entered the engine when its first token was produced.
    first_token_s: float | None = None

    def merge(self, later: Delta) -> Delta:
        """Two deltas as one (a slow reader gets several tokens in one chunk)."""
        return Delta(text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                     finish_reason=later.finish_reason, prompt_tokens=later.prompt_tokens,
                     completion_tokens=later.completion_tokens,
                     first_token_s=self.first_token_s if self.first_token_s is not None
                     else later.first_token_s)


__all__ = ["Delta", "EngineError", "EngineOverloaded", "SamplingParams"]
