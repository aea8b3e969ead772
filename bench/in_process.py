"""The CPU engine measured in this process, without HTTP: one request at a time (the
baseline the Serve app's throughput is compared with), concurrently (the engine's own batching
gain), and the batching ceiling of the model's forward pass alone."""

from __future__ import annotations

import asyncio
import time

from bench.load import MESSAGES
from bench.stats import RequestResult, Summary, summarize


def prompt_ids(engine) -> list[int]:
    """The bench's chat prompt as the engine sees it (the in-process runs start from ids)."""
    return list(engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))


async def run_in_process(engine, *, num_requests: int, max_tokens: int,
                         concurrency: int = 1) -> Summary:
    from serve.engines.base import SamplingParams

    ids = prompt_ids(engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one() -> RequestResult:
        res = RequestResult(ok=True)
        start = time.perf_counter()
        last = None
        async for d in engine.generate(ids, params):
            now = time.perf_counter()
            if d.text:
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
            res.output_tokens = d.completion_tokens
        res.e2e = time.perf_counter() - start
        return res

    await one()  # warm-up
    sem = asyncio.Semaphore(concurrency)

    async def limited() -> RequestResult:
        async with sem:
            return await one()

    start = time.perf_counter()
    results = await asyncio.gather(*[limited() for _ in range(num_requests)])
    return summarize("in-process", concurrency, True, results, time.perf_counter() - start)


def batching_ceiling(engine, *, max_tokens: int, batch: int, rounds: int = 3) -> dict:
    """What the model's forward pass alone allows: the engine's decode step run directly (no
    event loop, no queues, no HTTP) on 1 and on ``batch`` sequences. ``batch`` x (step time
    at 1) / (step time at ``batch``) bounds the tokens/s gain any server of this engine can
    get from batching on this machine; best of ``rounds``."""
    from serve.engines.base import SamplingParams
    from serve.engines.cpu_batch import DecodeBatch, Seq

    ids = prompt_ids(engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def step_ms(b: int) -> float:
        seqs = [Seq(request_id=str(i), prompt_ids=ids, params=params, max_tokens=max_tokens,
                    queue=None, generator=None) for i in range(b)]
        # A batch of its own over the engine's model: the engine's step thread never sees it.
        decode = DecodeBatch(engine.model, engine.tokenizer, eos_token_ids=engine.eos_token_ids,
                             pad_token_id=engine.pad_token_id,
                             max_model_len=engine.max_model_len)
        decode.step(seqs)  # prefill
        steps, start = 0, time.perf_counter()
        while decode.rows:
            decode.step([])
            steps += 1
        return (time.perf_counter() - start) * 1000 / steps

    one = min(step_ms(1) for _ in range(rounds))
    many = min(step_ms(batch) for _ in range(rounds))
    return {"step_ms_1": round(one, 3), f"step_ms_{batch}": round(many, 3),
            "gain": round(batch * one / many, 2)}


__all__ = ["batching_ceiling", "prompt_ids", "run_in_process"]
