"""The series the dashboards and alerts read, recorded by the code that serves: a model's
labels name its registered model version (and nothing a request controls), every request a
model replica takes ends in exactly one outcome (a stream's error event included), and
agent runs are counted by graph and status. Ray's metric objects are used for real (they
record without a cluster); what they were asked to record is read back from them."""

from __future__ import annotations

import asyncio

import pytest

from agents.metrics import RunMetrics
from serve.engines.base import EngineError
from serve.metrics import CLIENT_CLOSED, ModelMetrics, version_labels
from serve.protocol import SSE_DONE, error_body, sse


@pytest.mark.parametrize(("source", "labels"), [
    ("models:/rayplane-tool-llm/7", {"registered_model": "rayplane-tool-llm",
                                     "model_version": "7"}),
    ("models:/rayplane-tool-llm@champion", {"registered_model": "rayplane-tool-llm",
                                            "model_version": "@champion"}),
    ("runs:/0a1b2c/model", {"registered_model": "", "model_version": "unregistered"}),
    ("s3://bucket/models/x", {"registered_model": "", "model_version": "unregistered"}),
    ("/srv/models/tiny", {"registered_model": "", "model_version": "unregistered"}),
    (None, {"registered_model": "", "model_version": "unregistered"}),
])
def test_a_models_version_labels_come_from_its_source(source, labels):
    assert version_labels(source) == labels


class Recorded(ModelMetrics):
    """ModelMetrics whose outcomes are kept for the test (and still recorded)."""

    def __init__(self):
        super().__init__("tiny-chat", "models:/serve-tiny/3")
        self.seen: list[tuple[int, str | None]] = []

    def outcome(self, status, code=None):
        self.seen.append((status, code))
        super().outcome(status, code)


def run(coro):
    return asyncio.run(coro)


async def _value(v):
    return v


async def _raise(err):
    raise err


def test_every_series_carries_the_model_and_its_version_only():
    m = Recorded()
    assert m._tags == {"model": "tiny-chat", "registered_model": "serve-tiny",
                       "model_version": "3"}
    for metric in (m.ttft, m.itl, m.latency, m.tps, m.output_tokens, m.prompt_tokens):
        assert set(metric._tag_keys) == set(m._tags)
    assert set(m.requests._tag_keys) == {*m._tags, "status"}
    assert set(m.errors._tag_keys) == {*m._tags, "code"}


def test_unary_outcomes():
    m = Recorded()
    assert run(m.call(_value({"ok": 1}))) == {"ok": 1}
    with pytest.raises(EngineError):
        run(m.call(_raise(EngineError("too long", status=400, code="context_length_exceeded"))))
    with pytest.raises(RuntimeError):
        run(m.call(_raise(RuntimeError("engine died"))))
    with pytest.raises(asyncio.CancelledError):
        run(m.call(_raise(asyncio.CancelledError())))
    assert m.seen == [(200, None), (400, "context_length_exceeded"), (500, "internal_error"),
                      (CLIENT_CLOSED, "client_closed")]


async def _lines(*lines, fail: BaseException | None = None):
    for line in lines:
        yield line
    if fail is not None:
        raise fail


async def _drain(agen):
    return [line async for line in agen]


def test_stream_outcomes_follow_the_streams_end():
    m = Recorded()
    chunk = sse({"choices": [{"delta": {"content": "hi"}}]})
    assert run(_drain(m.stream(_lines(chunk, SSE_DONE)))) == [chunk, SSE_DONE]
    # a failure after the stream started is an error event in the 200 stream
    failed = sse(error_body("the replica serving this stream stopped; retry the request",
                            "service_unavailable", code="replica_unavailable"))
    assert run(_drain(m.stream(_lines(chunk, failed, SSE_DONE)))) == [chunk, failed, SSE_DONE]
    internal = sse(error_body("internal error: ValueError", "internal_server_error"))
    run(_drain(m.stream(_lines(internal, SSE_DONE))))
    with pytest.raises(EngineError):
        run(_drain(m.stream(_lines(fail=EngineError("bad", status=400, code="bad_value")))))
    assert m.seen == [(200, None), (503, "replica_unavailable"), (500, None),
                      (400, "bad_value")]


def test_a_client_that_leaves_mid_stream_counts_once_as_closed():
    m = Recorded()

    async def leave_early():
        agen = m.stream(_lines("data: 1\n\n", "data: 2\n\n", SSE_DONE))
        assert await agen.__anext__() == "data: 1\n\n"
        await agen.aclose()

    run(leave_early())
    assert m.seen == [(CLIENT_CLOSED, "client_closed")]


def test_agent_runs_are_counted_by_graph_and_status():
    metrics = RunMetrics()
    seen = []
    metrics.runs.inc = lambda value, tags: seen.append(("runs", tags))
    metrics.errors.inc = lambda value, tags: seen.append(("errors", tags))
    metrics.finished("tools", "success", 0.4)
    metrics.finished("tools", "error", 1.2, "model_endpoint_error")
    metrics.finished("ops", "error", 0.1)
    assert seen == [
        ("runs", {"graph": "tools", "status": "success"}),
        ("runs", {"graph": "tools", "status": "error"}),
        ("errors", {"graph": "tools", "code": "model_endpoint_error"}),
        ("runs", {"graph": "ops", "status": "error"}),
        ("errors", {"graph": "ops", "code": "internal_error"}),
    ]


def test_a_metric_that_fails_never_fails_the_run():
    metrics = RunMetrics()

    def broken(value, tags):
        raise ValueError("tag missing")

    metrics.runs.inc = broken
    metrics.finished("tools", "success", 0.1)  # no exception
