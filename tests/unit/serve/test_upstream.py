"""The ``openai-upstream`` engine's forwarding (serve/engines/upstream.py), without Ray:
against the real ``transformers serve`` (tests/support/upstream.py) and against tiny scripted
HTTP servers on loopback for what a real server will not do on demand (be down, hang, answer
503, die mid-stream, show the headers it got)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest

from serve.engines.base import EngineError
from serve.engines.upstream import UpstreamModelServer, UpstreamProxy
from serve.protocol import SSE_DONE, ChatCompletionRequest, CompletionRequest
from tests.support.upstream import free_port

KEY = "sk-upstream-test-0123456789"  # pragma: allowlist secret
HELLO = [{"role": "user", "content": "hello"}]


def model(base_url: str, **upstream) -> dict:
    return {"name": "served-name", "source": "upstream:test", "engine": "openai-upstream",
            "upstream": {"base_url": base_url, "model": "upstream-name", "api_key": None,
                         "connect_timeout_s": 1, "read_timeout_s": 5, "retries": 2,
                         **upstream}}


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="served-name", messages=HELLO, **kw)


# -- a scripted HTTP/1.1 server --------------------------------------------------------------

Handler = Callable[[dict, asyncio.StreamWriter], Awaitable[None]]


class Fake:
    """An HTTP server on a free loopback port whose answers ``handler(request, writer)``
    writes; ``requests`` holds what it got (method, path, headers, json body)."""

    def __init__(self, handler: Handler):
        self.handler, self.requests, self.server = handler, [], None

    async def __aenter__(self) -> Fake:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, v in
                           (f.split(":", 1) for f in fields if ":" in f)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                method, path, _ = line.split(" ", 2)
                req = {"method": method, "path": path, "headers": headers,
                       "json": json.loads(body) if body else None}
                self.requests.append(req)
                await self.handler(req, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(status: int, obj, headers: dict | None = None) -> Handler:
    async def handle(req, writer):
        await send(writer, status, obj, headers)
    return handle


async def send(writer, status: int, obj, headers: dict | None = None) -> None:
    body = json.dumps(obj).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
    await writer.drain()


def completion(model_name: str = "upstream-name") -> dict:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def chunk(text: str, finish: str | None = None) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "model": "upstream-name",
           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    data = f"data: {json.dumps(obj)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def streaming(*chunks: bytes, then: str = "close") -> Handler:
    """A chunked event stream of ``chunks``, then: 'close' (cut off mid-body), 'hang'."""
    async def handle(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunks))
        await writer.drain()
        if then == "hang":
            await asyncio.sleep(30)
        writer.close()
    return handle


async def drain(agen) -> list[str]:
    return [line async for line in agen]


def events(lines: list[str]) -> list[dict | str]:
    return [line if line == SSE_DONE else json.loads(line[len("data: "):]) for line in lines]


# -- the scripted cases ----------------------------------------------------------------------


def test_forwards_the_upstream_key_and_rewrites_the_model_both_ways(monkeypatch):
    monkeypatch.setenv("UPSTREAM_KEY_T", KEY)

    async def main():
        async with Fake(answer(200, completion())) as fake:
            proxy = UpstreamProxy(model(fake.base_url, api_key={"env": "UPSTREAM_KEY_T"}))
            out = await proxy.chat(chat(max_tokens=5, user="u1", custom_field=1), "rid-1")
            await proxy.aclose()
            return fake.requests, out, proxy

    (req,), out, proxy = asyncio.run(main())
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    assert req["headers"]["x-request-id"] == "rid-1"
    assert req["json"]["model"] == "upstream-name"
    # what the client set is forwarded, nothing it did not (unknown fields included)
    assert req["json"] == {"model": "upstream-name", "messages": HELLO, "max_tokens": 5,
                           "user": "u1", "custom_field": 1, "stream": False}
    assert out["model"] == "served-name" and out["choices"][0]["message"]["content"] == "hi"
    assert proxy.stats()["upstream"]["status"] == "up"
    assert KEY not in json.dumps(proxy.stats()) + json.dumps(proxy.card())


def test_key_file_is_read_and_a_missing_key_refuses_to_start(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    proxy = UpstreamProxy(model("http://127.0.0.1:9/v1", api_key={"file": str(key_file)}))
    assert proxy._headers("")["Authorization"] == f"Bearer {KEY}"
    key_file.write_text("sk-rotated\n")  # a rotated secret mount is picked up
    assert proxy._headers("")["Authorization"] == "Bearer sk-rotated"
    monkeypatch.delenv("NO_SUCH_UPSTREAM_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_UPSTREAM_KEY"):
        UpstreamProxy(model("http://127.0.0.1:9/v1", api_key={"env": "NO_SUCH_UPSTREAM_KEY"}))


def test_a_down_upstream_is_a_502_naming_its_host_quickly_after_the_retries():
    port = free_port()  # nothing listens there
    proxy = UpstreamProxy(model(f"http://user:pw@127.0.0.1:{port}/v1"))

    async def main():
        start = time.monotonic()
        with pytest.raises(EngineError) as unary:
            await proxy.chat(chat())
        with pytest.raises(EngineError) as streamed:  # refused before the first event
            await proxy.chat_stream(chat(stream=True)).__anext__()
        await proxy.check_health()  # a down upstream does not fail the replica
        return unary.value, streamed.value, time.monotonic() - start

    unary, streamed, took = asyncio.run(main())
    for err in (unary, streamed):
        assert err.status == 502 and err.code == "upstream_unreachable"
        assert f"127.0.0.1:{port}" in err.message and "pw" not in err.message
        assert err.body()["error"]["type"] == "upstream_error"
    assert took < 5  # 2 requests x 3 attempts with 0.25 + 0.5 s pauses, and a probe
    stats = proxy.stats()
    assert stats["retries"] == 4 and stats["failures"] == 2 and stats["requests"] == 2
    assert stats["upstream"]["status"] == "down"
    assert f"127.0.0.1:{port}" in stats["upstream"]["reason"]
    assert proxy.card()["upstream"]["url"] == f"http://127.0.0.1:{port}/v1"  # no credentials


def test_a_silent_upstream_is_a_504_after_read_timeout_and_is_not_retried():
    async def hang(req, writer):
        await asyncio.sleep(30)

    async def main():
        async with Fake(hang) as fake:
            proxy = UpstreamProxy(model(fake.base_url, read_timeout_s=0.5))
            start = time.monotonic()
            with pytest.raises(EngineError) as err:
                await proxy.chat(chat())
            return err.value, time.monotonic() - start, len(fake.requests)

    err, took, seen = asyncio.run(main())
    assert err.status == 504 and err.code == "upstream_timeout" and "0.5s" in err.message
    assert 0.4 < took < 2.5 and seen == 1


def test_503_is_retried_then_answered_and_a_lasting_503_keeps_its_retry_after():
    calls = []

    async def flaky(req, writer):
        calls.append(1)
        if len(calls) <= 2:
            await send(writer, 503, {"error": {"message": "loading"}}, {"Retry-After": "0"})
        else:
            await send(writer, 200, completion())

    async def main():
        async with Fake(flaky) as fake:
            proxy = UpstreamProxy(model(fake.base_url))
            out = await proxy.chat(chat())
        async with Fake(answer(503, {"detail": "busy"}, {"Retry-After": "0"})) as fake:
            down = UpstreamProxy(model(fake.base_url, retries=1))
            with pytest.raises(EngineError) as err:
                await down.chat(chat())
            return out, proxy.stats(), err.value, len(fake.requests)

    out, stats, err, seen = asyncio.run(main())
    assert out["model"] == "served-name" and stats["retries"] == 2 and stats["failures"] == 0
    assert err.status == 503 and err.type == "service_unavailable" and seen == 2
    assert "busy" in err.message and err.retry_after == 0


@pytest.mark.parametrize(("status", "body", "want", "code", "says"), [
    (400, {"detail": "bad temperature"}, 400, "upstream_rejected", "bad temperature"),
    (401, {"error": {"message": "invalid key"}}, 502, "upstream_auth_failed", "refuses"),
    (404, {"error": "no such model"}, 502, "upstream_not_found", "no such model"),
    (429, {"error": {"message": "slow down"}}, 429, "upstream_rate_limited", "slow down"),
    (500, {"message": "boom"}, 502, "upstream_error", "boom"),
])
def test_upstream_errors_map_to_the_platform_error_shape(status, body, want, code, says):
    async def main():
        async with Fake(answer(status, body)) as fake:
            proxy = UpstreamProxy(model(fake.base_url))
            with pytest.raises(EngineError) as err:
                await proxy.chat(chat())
            return err.value, len(fake.requests)

    err, seen = asyncio.run(main())
    assert (err.status, err.code, seen) == (want, code, 1)
    assert err.message.startswith("upstream 127.0.0.1:") and says in err.message


def test_a_stream_that_dies_midway_ends_with_an_error_event_and_is_not_retried():
    async def main():
        async with Fake(streaming(chunk("Hel"), chunk("lo"))) as fake:
            proxy = UpstreamProxy(model(fake.base_url))
            lines = await drain(proxy.chat_stream(chat(stream=True), "r"))
            return lines, len(fake.requests), proxy.stats()

    lines, seen, stats = asyncio.run(main())
    got = events(lines)
    assert [e["choices"][0]["delta"]["content"] for e in got[:2]] == ["Hel", "lo"]
    assert all(e["model"] == "served-name" for e in got[:2])
    assert got[2]["error"]["type"] == "upstream_error" and "127.0.0.1" in got[2]["error"]["message"]
    assert got[3] == SSE_DONE and len(got) == 4
    assert seen == 1 and stats["failures"] == 1 and stats["running"] == 0


def test_a_client_that_goes_away_closes_the_upstream_stream():
    closed = asyncio.Event()

    async def slow(req, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunk("a"))
        await writer.drain()
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                writer.write(chunk("b"))
                await writer.drain()
        except ConnectionError:
            closed.set()
        writer.close()

    async def main():
        async with Fake(slow) as fake:
            proxy = UpstreamProxy(model(fake.base_url))
            stream = proxy.chat_stream(chat(stream=True))
            first = await stream.__anext__()
            await stream.aclose()  # the ingress cancels the stream of a client gone away
            await asyncio.wait_for(closed.wait(), 5)
            return first, proxy.stats()

    first, stats = asyncio.run(main())
    assert json.loads(first[len("data: "):])["model"] == "served-name"
    assert stats["running"] == 0 and stats["failures"] == 0


def test_a_stream_gone_silent_ends_with_a_timeout_event():
    async def main():
        async with Fake(streaming(chunk("Hel"), then="hang")) as fake:
            proxy = UpstreamProxy(model(fake.base_url, read_timeout_s=0.5))
            return await drain(proxy.chat_stream(chat(stream=True)))

    got = events(asyncio.run(main()))
    assert got[0]["choices"][0]["delta"]["content"] == "Hel"
    assert got[1]["error"]["type"] == "timeout_error" and got[2] == SSE_DONE


def test_a_finished_stream_without_done_gets_one_and_the_deployment_counts_it():
    async def main():
        handler = streaming(chunk("Hi", "stop"), b"0\r\n\r\n")
        async with Fake(handler) as fake:
            server = UpstreamModelServer.func_or_class(model(fake.base_url))
            lines = await drain(server.chat_stream(chat(stream=True), "r"))
            card = server.card()
            await server.proxy.aclose()
            with pytest.raises(RuntimeError):  # a replica that cannot work fails its check
                await server.check_health()
            return lines, card

    lines, card = asyncio.run(main())
    got = events(lines)
    assert got[0]["choices"][0]["finish_reason"] == "stop" and got[-1] == SSE_DONE
    assert card["id"] == "served-name" and card["engine"] == "openai-upstream"
    assert card["root"] == "upstream:test" and card["upstream"]["model"] == "upstream-name"


# -- the real upstream: transformers serve -----------------------------------------------------


def test_the_real_upstream_answers_through_the_proxy(upstream_server):
    m = model(upstream_server["base_url"], model=upstream_server["model"], read_timeout_s=60)

    async def main():
        proxy = UpstreamProxy(m)
        try:
            unary = await proxy.chat(chat(max_tokens=4, temperature=0))
            streamed = await drain(proxy.chat_stream(chat(
                max_tokens=4, stream=True, stream_options={"include_usage": True})))
            text = await proxy.completion(CompletionRequest(model="served-name", prompt="hello",
                                                            max_tokens=3))
            text_stream = await drain(proxy.completion_stream(CompletionRequest(
                model="served-name", prompt="hello", max_tokens=3, stream=True)))
            await proxy.probe()
            wrong = UpstreamProxy({**m, "upstream": {**m["upstream"], "model": "not-it"}})
            with pytest.raises(EngineError) as refused:
                await wrong.chat(chat(max_tokens=2))
            await wrong.aclose()
            return unary, streamed, text, text_stream, proxy.stats(), refused.value
        finally:
            await proxy.aclose()

    unary, streamed, text, text_stream, stats, refused = asyncio.run(main())
    assert unary["model"] == "served-name" and unary["usage"]["completion_tokens"] == 4
    assert isinstance(unary["choices"][0]["message"]["content"], str)
    got = events(streamed)
    assert got[-1] == SSE_DONE and all(e["model"] == "served-name" for e in got[:-1])
    assert got[-3]["choices"][0]["finish_reason"] == "length"
    # it ignores stream_options: the proxy adds OpenAI's usage-only last chunk
    assert got[-2]["choices"] == [] and got[-2]["usage"]["completion_tokens"] == 4
    assert text["model"] == "served-name" and text["object"] == "text_completion"
    assert events(text_stream)[-1] == SSE_DONE
    assert stats["upstream"]["status"] == "up" and stats["failures"] == 0
    assert refused.status == 400 and "pinned" in refused.message  # its own `detail`
