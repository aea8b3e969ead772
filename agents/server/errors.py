"""The agents API's errors: every refusal and every failed run is answered in the platform's
one error shape, ``serve.protocol.error_body`` (OpenAI's ``{"error": {message, type, param,
code}}``), with the status a LangGraph client expects (404 unknown assistant, thread or run;
409 busy thread; 422 malformed body; 401 key; 502 model endpoint; 503 PostgreSQL).

The langgraph-sdk client reads ``error.message`` from this body (its ``_extract_error_message``
looks inside ``{"error": {...}}``), so the SDK's exceptions carry our one-line message.
"""

from __future__ import annotations

from typing import Any

from serve.protocol import error_body


class ApiError(Exception):
    """A request the API refuses, or a run that failed: its HTTP status and error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param = code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"{kind} {ident!r} not found", "not_found_error",
                    code=f"{kind}_not_found", param=f"{kind}_id")


def busy(thread_id: str) -> ApiError:
    return ApiError(409, f"thread {thread_id!r} is busy with another run; wait for it, or "
                         "send multitask_strategy 'enqueue' to queue this run after it",
                    "conflict_error", code="thread_busy", param="multitask_strategy")


def database_down(detail: str) -> ApiError:
    return ApiError(503, f"PostgreSQL (the agents' threads) is unavailable: {detail}",
                    "service_unavailable_error", code="database_unavailable")


def model_down(message: str) -> ApiError:
    """The model's OpenAI endpoint is down or refused: the message names it (it comes from
    agents.graphs.model.ModelEndpointError)."""
    return ApiError(502, message, "upstream_error", code="model_endpoint_error")


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's request validation errors as one 422 naming the first bad field."""
    if not errors:
        return ApiError(422, "malformed request body", code="invalid_body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())
           if p not in ("body", "query", "path") and not _union_member(p)]
    where = ".".join(loc).replace(".[", "[") or "body"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    # A body-wide check names the field itself ("metadata.k: text must not ..."): fold it in.
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head:
        where, msg = (head if where == "body" else f"{where}.{head}"), rest
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(422, f"{where}: {msg}{more}", code="invalid_body", param=where)


def _union_member(part: object) -> bool:
    """pydantic names the member of a union it tried in the error's location (``Checkpoint``,
    ``str``, ``list[str]``): not a field of the request."""
    import re

    text = str(part)
    return isinstance(part, str) and (bool(re.fullmatch(r"[A-Z]\w*", text)) or "[" in text
                                      or text in ("str", "int", "float", "bool", "none"))


def from_exception(err: BaseException) -> ApiError:
    """The API error a failed run or request answers with: a refusal as it is, the model's
    endpoint 502, the database 503, anything else 500 naming the exception."""
    import psycopg
    from psycopg_pool import PoolTimeout

    from agents.graphs.model import ModelEndpointError
    from raycluster.errors import PlatformError

    if isinstance(err, ApiError):
        return err
    if isinstance(err, ModelEndpointError):
        return _model_refused(err) or model_down(str(err))
    if isinstance(err, (psycopg.OperationalError, PoolTimeout, psycopg.InterfaceError)):
        return database_down(" ".join(str(err).split()) or type(err).__name__)
    if isinstance(err, PlatformError) and "PostgreSQL" in str(err):
        return database_down(str(err))
    if _is_validation(err):
        return ApiError(422, f"the run's input was refused: {_first_line(err)}",
                        code="invalid_input", param="command")
    refused = _refused_by_graph(err)
    if refused is not None:
        return refused
    return ApiError(500, f"internal error: {type(err).__name__}: {_first_line(err)}",
                    "server_error", code="internal_error")


def _model_refused(err: BaseException) -> ApiError | None:
    """The model endpoint answered 400/422 to the conversation the run built from the
    client's input (no message at all, a context too long): the client's input to fix, not
    an upstream failure."""
    import openai

    cause = err.__cause__
    if isinstance(cause, openai.BadRequestError | openai.UnprocessableEntityError):
        return ApiError(422, f"the model refused this run's conversation: {err}",
                        code="invalid_input", param="input")
    return None


def _refused_by_graph(err: BaseException) -> ApiError | None:
    """LangGraph refusing what the client sent: no input for a thread without state, an
    update (``command.update``, ``POST /threads/{id}/state``) its channels cannot take."""
    from langgraph.errors import EmptyInputError, InvalidUpdateError

    if isinstance(err, EmptyInputError):
        return ApiError(422, "the run has no input: send input, or a command to resume a "
                             "thread stopped at an interrupt", code="invalid_input",
                        param="input")
    if isinstance(err, InvalidUpdateError):
        return ApiError(422, f"the graph refused the update: {_first_line(err)}",
                        code="invalid_update", param="values")
    return None


def _is_validation(err: BaseException) -> bool:
    from pydantic import ValidationError

    return isinstance(err, ValidationError)


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return (" ".join(lines[:3]))[:500] if lines else type(err).__name__


__all__ = ["ApiError", "busy", "database_down", "from_exception", "model_down", "not_found",
           "validation_error"]
