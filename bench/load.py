"""The load generator: concurrent clients over real HTTP with the official ``openai`` client
(async, streaming), every request the same chat prompt and exactly ``max_tokens`` output tokens
(``ignore_eos``, greedy), so every system measured does the same work."""

from __future__ import annotations

import asyncio
import time

from bench.stats import RequestResult, Summary, summarize

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"}]


async def http_request(client, model: str, max_tokens: int, stream: bool) -> RequestResult:
    start = time.perf_counter()
    try:
        kw = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens,
              "temperature": 0, "extra_body": {"ignore_eos": True}}
        if not stream:
            r = await client.chat.completions.create(**kw)
            e2e = time.perf_counter() - start
            return RequestResult(ok=True, ttft=e2e, e2e=e2e,
                                 output_tokens=r.usage.completion_tokens)
        res = RequestResult(ok=True)
        last = None
        response = await client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw)
        async for chunk in response:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
            if chunk.usage:
                res.output_tokens = chunk.usage.completion_tokens
        res.e2e = time.perf_counter() - start
        return res
    except Exception as err:  # noqa: BLE001 - a failed request is a data point
        return RequestResult(ok=False, error=f"{type(err).__name__}: {str(err)[:120]}")


async def run_http(system: str, base_url: str, api_key: str, model: str, *, concurrency: int,
                   num_requests: int, max_tokens: int, stream: bool = True) -> Summary:
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(
                             max_connections=concurrency * 2)))
    await http_request(client, model, 4, stream)  # warm the connection and the path
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            return await http_request(client, model, max_tokens, stream)

    start = time.perf_counter()
    results = await asyncio.gather(*[one() for _ in range(num_requests)])
    duration = time.perf_counter() - start
    await client.close()
    return summarize(system, concurrency, stream, results, duration)


__all__ = ["MESSAGES", "http_request", "run_http"]
