"""OpenAI request and response models (the subset rayplane serves), after vLLM's
``entrypoints/openai/protocol.py``.

Requests accept fields they do not know -- OpenAI clients send new ones all the time -- and
the server logs them (:func:`unknown_fields`) instead of refusing or silently dropping them.
Known fields are validated with OpenAI's documented ranges, so a bad value is a 400 that names
the parameter, never a 500.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class OpenAIModel(BaseModel):
    """Base of request models: unknown fields are kept (and logged), never an error."""

    model_config = ConfigDict(extra="allow")


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Paths of the fields a request carried that the server does not know."""
    found = [f"{prefix}{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, OpenAIModel):
                sub = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                found += unknown_fields(item, sub)
    return found


# -- requests ---------------------------------------------------------------------------------


class FunctionCall(OpenAIModel):
    name: str = Field(description="Function name.")
    arguments: str = Field(description="Arguments as a JSON string.")


class ToolCall(OpenAIModel):
    id: str = Field(description="Tool call id, echoed by the tool message.")
    type: Literal["function"] = Field(default="function", description="Always 'function'.")
    function: FunctionCall = Field(description="The called function.")


class ContentPart(OpenAIModel):
    type: str = Field(description="Part type; only 'text' is served by text models.")
    text: str | None = Field(default=None, description="Text of a 'text' part.")


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Author of the message.")
    content: str | list[ContentPart] | None = Field(default=None, description="Message text.")
    name: str | None = Field(default=None, description="Optional author name.")
    tool_calls: list[ToolCall] | None = Field(default=None,
                                              description="Assistant: the tools it called.")
    tool_call_id: str | None = Field(default=None, description="Tool: the call it answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content part type {part.type!r} is not supported by a text "
                                 "model; use 'text'")
        return "".join(p.text or "" for p in self.content)


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1, max_length=64, description="Function name.")
    description: str | None = Field(default=None, description="What the function does.")
    parameters: dict[str, Any] | None = Field(default=None, description="JSON schema.")
    strict: bool | None = Field(default=None, description="Strict schema adherence.")


class Tool(OpenAIModel):
    type: Literal["function"] = Field(default="function", description="Always 'function'.")
    function: FunctionDefinition = Field(description="The function the model may call.")


class NamedFunction(OpenAIModel):
    name: str = Field(description="Function the model must call.")


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = Field(default="function", description="Always 'function'.")
    function: NamedFunction = Field(description="The function to call.")


class StreamOptions(OpenAIModel):
    include_usage: bool | None = Field(default=False,
                                       description="Send a last chunk with the usage.")


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions."""

    model: str = Field(description="Served model name (GET /v1/models).")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0,
                                      description="Sampling temperature; 0 is greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling.")
    n: int = Field(default=1, ge=1, le=16, description="Choices to generate.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    stream: bool = Field(default=False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1,
                             description="Seed for reproducible sampling (a 64-bit integer).")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                           description="Not supported: only 0 is accepted.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                            description="Not supported: only 0 is accepted.")
    logit_bias: dict[str, float] | None = Field(default=None,
                                                description="Not supported: must be empty.")
    user: str | None = Field(default=None, description="End-user id (logged).")
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep generating past "
                                                        "EOS (benchmarks).")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: only 0 is supported by this server")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(default=None, ge=1,
                                              description="Newer name of max_tokens.")
    tools: list[Tool] | None = Field(default=None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="Whether and which tool the model must call.")
    parallel_tool_calls: bool | None = Field(default=None, description="Several calls per turn.")
    logprobs: bool | None = Field(default=None, description="Not supported: only false.")
    top_logprobs: int | None = Field(default=None, description="Not supported.")
    response_format: dict[str, Any] | None = Field(default=None,
                                                   description="Only {'type': 'text'}.")

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs: not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice: function {self.tool_choice.function.name!r} "
                                 f"is not among the declared tools {names}")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice: 'required' needs at least one tool in tools")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: differs from max_tokens; send one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Prompt text, texts, token ids or lists of token ids.")
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens (OpenAI's "
                                                                 "default 16).")
    echo: bool = Field(default=False, description="Prepend the prompt to the completion.")
    suffix: str | None = Field(default=None, description="Not supported.")
    logprobs: int | None = Field(default=None, description="Not supported.")
    best_of: int | None = Field(default=None, description="Only equal to n.")

    @model_validator(mode="after")
    def _completion_rules(self):
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.logprobs:
            raise ValueError("logprobs: not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError(f"best_of: only equal to n ({self.n}) is supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# -- responses --------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the prompt (once, whatever n is).")
    completion_tokens: int = Field(description="Tokens generated over all choices.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error.")
    param: str | None = Field(default=None, description="The request field at fault.")
    code: str | None = Field(default=None, description="Machine-readable reason.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _utf8(text: str | None) -> str | None:
    """``text`` as UTF-8 can carry it: a lone surrogate a client sent (JSON's ``\\ud800``),
    echoed in a message, becomes '?' instead of failing the response's encoding (a 500)."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body ``{"error": {message, type, param, code}}``: the one place it is
    built, for HTTP error responses and for error events inside a started stream alike."""
    return ErrorResponse(error=ErrorDetail(message=_utf8(message), type=type, param=_utf8(param),
                                           code=code)).model_dump()


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ModelCard(BaseModel):
    id: str = Field(description="Served model name.")
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "rayplane"
    root: str | None = Field(default=None, description="Where the weights came from (resolved "
                                                       "registry version, URI or folder).")
    max_model_len: int | None = Field(default=None, description="Context length served.")
    engine: str | None = Field(default=None, description=(
        "What serves it: cpu, triton, openai-upstream (the serve spec's engine)."))
    upstream: dict[str, str] | None = Field(default=None, description=(
        "openai-upstream: the server's URL (no credentials) and its name of the model."))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The reply's text (null when it only calls tools).")
    tool_calls: list[ToolCall] | None = Field(default=None, description="Tools it called.")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """The answer of a non-streamed ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    """The answer of a non-streamed ``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Health(BaseModel):
    """``GET /healthz``: 200 when every model's engine answers, else 503 (degraded)."""

    status: Literal["ok", "degraded"]
    models: dict[str, dict[str, Any]] = Field(description="Each model's engine counters, or "
                                                          "{error} when it did not answer.")


# -- the OpenAPI document ---------------------------------------------------------------------

_ERRORS = {400: "The request is invalid (the parameter is named).",
           401: "Missing or incorrect API key.", 404: "No such model or route.",
           429: "The API key is over its rate limit (see Retry-After).",
           500: "Internal error.", 503: "The model is overloaded or restarting (Retry-After)."}
#: (method, path) -> (request model, 200 model, streamed, error statuses, needs a key)
OPENAPI_ROUTES: dict[tuple[str, str], tuple[Any, Any, bool, tuple[int, ...], bool]] = {
    ("get", "/healthz"): (None, Health, False, (), False),
    ("get", "/v1/models"): (None, ModelList, False, (401, 429, 500), True),
    ("get", "/v1/models/{model}"): (None, ModelCard, False, (401, 404, 429, 500), True),
    ("post", "/v1/chat/completions"): (ChatCompletionRequest, ChatCompletion, True,
                                       (400, 401, 404, 429, 500, 503), True),
    ("post", "/v1/completions"): (CompletionRequest, Completion, True,
                                  (400, 401, 404, 429, 500, 503), True),
}


def _ref(model: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's OpenAPI document of the OpenAI routes completed with what it cannot see (the
    ingress reads bodies itself, so that a missing key is a 401 before any body check): the
    request bodies, the answers (JSON, or server-sent events when ``stream`` is true), every
    error in OpenAI's shape, and the bearer key. Clients and schemathesis generate from it."""
    from pydantic.json_schema import models_json_schema

    models = [(m, "validation") for m in (ChatCompletionRequest, CompletionRequest)]
    models += [(m, "serialization") for m in (ChatCompletion, Completion, ModelList, ModelCard,
                                              Health, ErrorResponse)]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for (method, path), (body, answer, streamed, errors, keyed) in OPENAPI_ROUTES.items():
        op = doc.get("paths", {}).get(path, {}).get(method)
        if op is None:
            continue
        content: dict[str, Any] = {"application/json": {"schema": _ref(answer)}}
        if streamed:
            content["text/event-stream"] = {"schema": {
                "type": "object", "required": ["data"],
                "properties": {"data": {"type": "string"}},
                "description": "stream: true -- `data: <chunk JSON>` events, an error event in "
                               "the error shape if the stream fails, then `data: [DONE]`."}}
        responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
        if answer is Health:
            responses["503"] = {"description": "A model's engine did not answer.",
                                "content": {"application/json": {"schema": _ref(Health)}}}
        for status in errors:
            responses[str(status)] = {"description": _ERRORS[status], "content": {
                "application/json": {"schema": _ref(ErrorResponse)}}}
        op["responses"] = responses
        if body is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": _ref(body)}}}
        op["security"] = [{"bearer": []}] if keyed else []
    return doc


def install_openapi(app: Any) -> None:
    """Serve :func:`document_openapi`'s document as ``app``'s ``/openapi.json``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_openapi(generate())
        return app.openapi_schema

    app.openapi = openapi


def completion_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


__all__ = ["OPENAPI_ROUTES", "SSE_DONE", "ChatCompletion", "ChatCompletionRequest", "ChatMessage",
           "Completion", "CompletionRequest", "ContentPart", "ErrorDetail", "ErrorResponse",
           "FunctionCall", "Health", "ModelCard", "ModelList", "NamedToolChoice",
           "SamplingFields", "StreamOptions", "Tool", "ToolCall", "Usage", "completion_id",
           "document_openapi", "error_body", "install_openapi", "sse", "unknown_fields"]
