"""The OpenAI layer in-process: request validation, tool-call parsing and streaming, the
SSE stream's shape, and usage -- the same code the Serve replicas run."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from serve.engines.base import EngineError
from serve.engines.cpu import CPUEngine
from serve.protocol import ChatCompletionRequest, CompletionRequest, unknown_fields
from serve.serving import OpenAIServing
from serve.tools import ToolStreamFilter, forced_prefix, parse_tool_calls
from tests.support import tiny_model as tm


@pytest.fixture(scope="module")
def serving(tiny_model) -> OpenAIServing:
    return OpenAIServing(CPUEngine(tiny_model, max_num_seqs=8), "tiny", root="test")


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "tiny", "messages": tm.GREETING,
                                                 "temperature": 0, **kw})


def sse_events(writes: list[str]) -> list:
    """The events of a stream's writes (a write may hold several)."""
    out = []
    for write in writes:
        assert write.startswith("data: ") and write.endswith("\n\n")
        for event in write[:-2].split("\n\n"):
            assert event.startswith("data: ")
            payload = event[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def collect(agen) -> list[str]:
    return [x async for x in agen]


def test_unknown_fields_are_kept_and_reported():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi", "audio": None}],
        "store": True, "metadata": {"k": "v"}})
    assert sorted(unknown_fields(req)) == ["messages[0].audio", "metadata", "store"]


@pytest.mark.parametrize("body, where", [
    ({"temperature": 2.5}, "temperature"),
    ({"n": 17}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logprobs": True}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
])
def test_bad_values_fail_validation_naming_the_parameter(body, where):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"model": "m", "messages": tm.GREETING, **body})
    e = err.value.errors()[0]
    assert where in str(e["loc"]) or where in e["msg"]


def test_tool_call_parsing_only_accepts_declared_tools_and_valid_json():
    text = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    calls, rest = parse_tool_calls(text, {"calculator"})
    assert rest == "" and calls[0]["function"]["name"] == "calculator"
    assert json.loads(calls[0]["function"]["arguments"]) == {"expression": "1+1"}
    assert parse_tool_calls(text, {"convert_units"}) == (None, text)
    broken = '<tool_call>{"name": "calculator", "arguments": {</tool_call>'
    assert parse_tool_calls(broken, {"calculator"}) == (None, broken)


def test_stream_filter_never_leaks_partial_markup():
    f = ToolStreamFilter(True, {"calculator"})
    sent = "".join(f.feed(piece) for piece in
                   ["Sure", " <", "tool", "_call>", '{"name": "calculator", "arguments": {}}',
                    "</tool_call>"])
    assert sent == "Sure "
    rest, calls = f.finish()
    assert calls and calls[0]["function"]["name"] == "calculator" and rest == ""
    plain = ToolStreamFilter(True, {"calculator"})
    assert plain.feed("a <to") == "a " and plain.finish() == ("<to", None)
    assert ToolStreamFilter(True, set()).feed("a <b") == "a <b"


def test_forced_prefix_for_tool_choice():
    assert forced_prefix("required", []) == "<tool_call>"
    named = ChatCompletionRequest.model_validate({
        "model": "m", "messages": tm.TOOL_QUESTION, "tools": tm.TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "convert_units"}}})
    assert forced_prefix(named.tool_choice, named.tools) == \
        '<tool_call>{"name": "convert_units", "arguments":'
    assert forced_prefix("auto", []) == forced_prefix("none", []) == ""


def test_chat_stream_shape_and_usage(serving):
    full = asyncio.run(serving.chat(chat()))
    assert full["choices"][0]["message"]["content"] == tm.GREETING_REPLY
    events = sse_events(asyncio.run(collect(serving.chat_stream(
        chat(stream=True, stream_options={"include_usage": True})))))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in body) == \
        tm.GREETING_REPLY
    assert [c["choices"][0]["finish_reason"] for c in body][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert all(c["usage"] is None for c in body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_events_without_text_ride_with_the_next_write(serving):
    """Every write costs the same whatever it carries (issue 16): the role chunk goes out
    with the first text, the finish and usage chunks with [DONE]; each other write is text."""
    writes = asyncio.run(collect(serving.chat_stream(
        chat(stream=True, stream_options={"include_usage": True}))))
    first, last = sse_events(writes[:1]), sse_events(writes[-1:])
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(first) == 2 and first[1]["choices"][0]["delta"]["content"]
    assert last[-1] == "[DONE]" and last[-2]["usage"]["completion_tokens"] > 0
    assert last[-3]["choices"][0]["finish_reason"] == "stop"
    middle = sse_events(writes[1:-1])
    assert len(middle) == len(writes) - 2
    assert all(e["choices"][0]["delta"]["content"] for e in middle)


def test_tool_calls_and_tool_choice_none(serving):
    r = asyncio.run(serving.chat(chat(messages=tm.TOOL_QUESTION, tools=tm.TOOLS)))
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == \
        tm.TOOL_CALL["arguments"]
    # tool_choice none: no tools in the prompt, no parsing; the text is returned as is.
    r = asyncio.run(serving.chat(chat(messages=tm.TOOL_QUESTION, tools=tm.TOOLS,
                                      tool_choice="none", max_tokens=60)))
    assert "tool_calls" not in r["choices"][0]["message"]


def test_completions_with_several_prompts_and_n(serving):
    req = CompletionRequest.model_validate({"model": "tiny", "temperature": 0, "n": 2,
                                            "prompt": [tm.COMPLETION_PROMPT, "The quick"],
                                            "max_tokens": 40})
    r = asyncio.run(serving.completion(req))
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"] == tm.COMPLETION_TEXT
    tok = serving.engine.tokenizer
    assert r["usage"]["prompt_tokens"] == len(tok.encode(tm.COMPLETION_PROMPT)) + \
        len(tok.encode("The quick"))
    events = sse_events(asyncio.run(collect(serving.completion_stream(
        CompletionRequest.model_validate({**req.model_dump(exclude_none=True),
                                          "stream": True})))))
    texts = {i: "" for i in range(4)}
    for e in events[:-1]:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == {c["index"]: c["text"] for c in r["choices"]}


def test_too_long_prompt_is_refused_before_the_stream_starts(serving):
    gen = serving.chat_stream(chat(messages=[{"role": "user", "content": "word " * 1200}],
                                   stream=True))
    with pytest.raises(EngineError) as err:
        asyncio.run(gen.__anext__())
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"


def test_api_keys_from_env_and_file_with_rotation(tmp_path, monkeypatch):
    import os

    from serve.auth import ApiKeyStore

    keys = tmp_path / "keys"
    keys.write_text("# comment\nrp-file-key\n")
    monkeypatch.setenv("RP_KEYS", "rp-env-a, rp-env-b")
    monkeypatch.setenv("RP_DIR", str(tmp_path))
    store = ApiKeyStore(env="RP_KEYS", file="${RP_DIR}/keys")
    assert all(store.valid(k) for k in ("rp-file-key", "rp-env-a", "rp-env-b"))
    assert not store.valid("rp-wrong") and not store.valid("")
    keys.write_text("rp-rotated\n")
    os.utime(keys, (1, 1))  # a different mtime, whatever the clock's resolution
    store._checked = 0.0  # skip the 2 s re-check interval
    assert store.valid("rp-rotated") and not store.valid("rp-file-key")
    monkeypatch.delenv("RP_KEYS")
    keys.write_text("")
    with pytest.raises(RuntimeError, match="refusing to serve without keys"):
        ApiKeyStore(env="RP_KEYS", file=str(keys))


def failing_after(engine: CPUEngine, good_steps: int) -> CPUEngine:
    """``engine`` whose step fails (a bad kernel, out of memory) after ``good_steps``."""
    step, calls = engine._step, []

    def step_then_fail(admitted):
        calls.append(1)
        if len(calls) > good_steps:
            raise RuntimeError("kernel exploded")
        return step(admitted)

    engine._step = step_then_fail
    return engine


def test_engine_failure_mid_stream_is_an_error_event_not_a_finish_reason(tiny_model):
    """Tokens went out, then the engine failed: the stream carries an error event in OpenAI's
    shape and ends with [DONE]; no choice ever ends with a finish reason outside OpenAI's
    documented set (there is no finish_reason "error")."""
    from serve.protocol import ErrorResponse

    serving = OpenAIServing(failing_after(CPUEngine(tiny_model, max_num_seqs=4), 3), "tiny")
    events = sse_events(asyncio.run(collect(serving.chat_stream(
        chat(stream=True, max_tokens=40)))))
    assert events[-1] == "[DONE]"
    error = ErrorResponse.model_validate(events[-2])
    assert events[-2] == {"error": error.error.model_dump()}
    assert (error.error.type, error.error.code) == ("internal_server_error", "engine_error")
    assert "kernel exploded" in error.error.message
    chunks = events[:-2]
    assert any(c["choices"][0]["delta"].get("content") for c in chunks)  # it was mid-stream
    documented = {None, "stop", "length", "tool_calls", "content_filter", "function_call"}
    assert {c["choices"][0]["finish_reason"] for c in chunks} <= documented


def test_engine_failure_of_a_whole_response_is_a_500_engine_error(tiny_model):
    """Not streamed: the request fails with the engine's own error (status 500 and OpenAI's
    body), not with a group of its choices' failures."""
    serving = OpenAIServing(failing_after(CPUEngine(tiny_model, max_num_seqs=4), 1), "tiny")
    with pytest.raises(EngineError) as err:
        asyncio.run(serving.chat(chat(n=2, max_tokens=20)))
    assert (err.value.status, err.value.code) == (500, "engine_error")
    assert err.value.body()["error"]["type"] == "internal_server_error"


def test_every_error_body_is_built_from_the_protocol_models(tmp_path):
    """The ingress' responses, the engine's errors and the API-key check (shared with the vLLM
    middleware) give one shape: {"error": {message, type, param, code}}."""
    from serve.auth import ApiKeyStore, authenticate
    from serve.ingress import _error
    from serve.protocol import ErrorResponse, error_body

    keys = tmp_path / "keys"
    keys.write_text("rp-good\n")
    store = ApiKeyStore(file=str(keys))
    bodies = [EngineError("too long", param="messages", code="context_length_exceeded").body(),
              authenticate(store, ""), authenticate(store, "Bearer rp-bad"),
              json.loads(_error(404, "no such model", param="model").body)]
    for body in bodies:
        assert body == ErrorResponse.model_validate(body).model_dump()
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert bodies[0] == error_body("too long", "invalid_request_error", "messages",
                                   "context_length_exceeded")
    assert [b["error"]["code"] for b in bodies[1:3]] == ["missing_api_key", "invalid_api_key"]
    assert authenticate(store, "Bearer rp-good") is None
