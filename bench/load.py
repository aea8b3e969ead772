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


#: Seconds a whole run may take per output token it asks for (requests x max_tokens, as if
#: one at a time), beyond a fixed minute: ten times what the demo-size model on a busy CPU
#: needs, so only a stuck run (a replica that never answers) trips it.
SECONDS_PER_TOKEN = 0.25


class RunTimeout(Exception):
    """A run did not finish within its budget (:func:`run_budget_s`); one line."""


def run_budget_s(num_requests: int, max_tokens: int) -> float:
    return 60 + num_requests * max(max_tokens, 1) * SECONDS_PER_TOKEN


async def run_http(system: str, base_url: str, api_key: str, model: str, *, concurrency: int,
                   num_requests: int, max_tokens: int, stream: bool = True) -> Summary:
    """One run; :class:`RunTimeout` when it (the warm-up request included) takes more than
    :func:`run_budget_s` (each request also gives up after 300 s)."""
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(
                             max_connections=concurrency * 2)))

    async def run() -> Summary:
        await http_request(client, model, 4, stream)  # warm the connection and the path
        sem = asyncio.Semaphore(concurrency)

        async def one():
            async with sem:
                return await http_request(client, model, max_tokens, stream)

        start = time.perf_counter()
        results = await asyncio.gather(*[one() for _ in range(num_requests)])
        return summarize(system, concurrency, stream, results, time.perf_counter() - start)

    budget = run_budget_s(num_requests + 1, max_tokens)
    try:
        return await asyncio.wait_for(run(), budget)
    except TimeoutError:
        raise RunTimeout(f"serve_bench: the {system} run (c={concurrency}, {num_requests} "
                         f"requests of {max_tokens} tokens at {base_url}) did not finish "
                         f"within {budget:.0f}s") from None
    finally:
        await client.close()


__all__ = ["MESSAGES", "SECONDS_PER_TOKEN", "RunTimeout", "http_request", "run_budget_s",
           "run_http"]
