"""The chat model of a graph: any OpenAI-compatible endpoint (the platform's served model,
vLLM, OpenAI itself) through ``langchain_openai.ChatOpenAI``.

Defaults come from the variables ``rayplane env`` exports: ``OPENAI_BASE_URL``, and the API
key from ``OPENAI_API_KEY`` or the key file ``RAYPLANE_API_KEY_FILE``. Calls are bounded: a
request timeout and few retries, and :func:`invoke_model` turns the OpenAI client's errors
into one-line :class:`ModelEndpointError` naming the endpoint, so a graph whose model is down
fails within seconds with an error that says where it looked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raycluster.errors import PlatformError

#: The model name of the platform's serve configs (serve/configs/local.yaml, eks-vllm.yaml).
DEFAULT_MODEL = "rayplane-tool-llm"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 1


class ModelEndpointError(PlatformError):
    """The model's OpenAI endpoint did not answer, or refused the request."""

    def __init__(self, message: str, *, base_url: str | None = None):
        super().__init__(message)
        self.base_url = base_url


def read_api_key_file(path: str | Path) -> str:
    """The first key of a key file (one key a line, ``#`` comments: the format the serving
    layer reads, serve/auth.py)."""
    path = Path(os.path.expandvars(str(path))).expanduser()
    try:
        text = path.read_text()
    except OSError as err:
        raise PlatformError(f"API key file {path}: cannot read it ({err.strerror or err})"
                            ) from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    raise PlatformError(f"API key file {path}: holds no key")


def resolve_endpoint(base_url: str | None = None, api_key: str | None = None,
                     api_key_file: str | Path | None = None) -> tuple[str, str]:
    """(base URL, API key): the arguments, else OPENAI_BASE_URL and OPENAI_API_KEY, else the
    key file (argument or RAYPLANE_API_KEY_FILE)."""
    base = base_url or os.environ.get("OPENAI_BASE_URL")
    if not base:
        raise PlatformError("no model endpoint: pass base_url or set OPENAI_BASE_URL "
                            "(`rayplane env` prints the local platform's)")
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if not key:
        key_file = api_key_file or os.environ.get("RAYPLANE_API_KEY_FILE")
        if not key_file:
            raise PlatformError("no API key: pass api_key, or set OPENAI_API_KEY or "
                                "RAYPLANE_API_KEY_FILE (`rayplane env` prints them)")
        key = read_api_key_file(key_file)
    return base.rstrip("/"), key


def chat_model(*, base_url: str | None = None, api_key: str | None = None,
               api_key_file: str | Path | None = None, model: str | None = None,
               timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
               **kwargs: Any):
    """A ``ChatOpenAI`` for the endpoint (greedy: temperature 0). ``model`` defaults to
    RAYPLANE_MODEL, else the platform's served model name."""
    from langchain_openai import ChatOpenAI

    base, key = resolve_endpoint(base_url, api_key, api_key_file)
    name = model or os.environ.get("RAYPLANE_MODEL") or DEFAULT_MODEL
    kwargs.setdefault("temperature", 0)
    return ChatOpenAI(base_url=base, api_key=key, model=name, timeout=timeout,
                      max_retries=max_retries, **kwargs)


def endpoint_of(model: Any) -> str | None:
    """The base URL a chat model talks to (None for a model that is no OpenAI client)."""
    bound = getattr(model, "bound", model)  # a model with bind_tools(...) is a binding
    return getattr(bound, "openai_api_base", None)


def describe_error(err: Exception, base_url: str | None) -> str:
    """One line naming the endpoint and what went wrong."""
    import openai

    where = f"model endpoint {base_url}" if base_url else "model endpoint"
    if isinstance(err, openai.APITimeoutError):
        return f"{where} did not answer in time (request timed out)"
    if isinstance(err, openai.APIConnectionError):
        cause: BaseException | None = err
        while isinstance(cause, openai.OpenAIError):  # the transport's own error says why
            cause = cause.__cause__ or cause.__context__
        detail = str(cause or err)
        return f"{where} is unreachable ({detail})"
    if isinstance(err, openai.APIStatusError):
        body = err.body.get("error", err.body) if isinstance(err.body, dict) else None
        message = body.get("message") if isinstance(body, dict) else None
        message = message or err.message
        return f"{where} answered HTTP {err.status_code}: {message}"
    return f"{where} failed: {type(err).__name__}: {err}"


def invoke_model(model: Any, messages: list, *, base_url: str | None = None, **kwargs: Any):
    """``model.invoke(messages)``; an OpenAI client error becomes a
    :class:`ModelEndpointError` naming the endpoint."""
    import openai

    try:
        return model.invoke(messages, **kwargs)
    except openai.OpenAIError as err:
        url = base_url or endpoint_of(model)
        raise ModelEndpointError(describe_error(err, url), base_url=url) from err


async def ainvoke_model(model: Any, messages: list, *, base_url: str | None = None,
                        **kwargs: Any):
    """:func:`invoke_model`, awaited (``model.ainvoke``)."""
    import openai

    try:
        return await model.ainvoke(messages, **kwargs)
    except openai.OpenAIError as err:
        url = base_url or endpoint_of(model)
        raise ModelEndpointError(describe_error(err, url), base_url=url) from err


__all__ = ["DEFAULT_MODEL", "ModelEndpointError", "ainvoke_model", "chat_model", "describe_error",
           "endpoint_of", "invoke_model", "read_api_key_file", "resolve_endpoint"]
