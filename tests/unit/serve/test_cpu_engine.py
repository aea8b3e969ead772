"""The CPU engine: continuous batching must not change what greedy decoding produces (the
reference is ``transformers``' own ``generate``), requests join and leave a running batch,
and stop strings, seeds, limits and cancellation behave as OpenAI clients expect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serve.engines.base import EngineError, EngineOverloaded, SamplingParams
from serve.engines.cpu import CPUEngine
from tests.support import tiny_model as tm


@pytest.fixture(scope="module")
def engine(tiny_model) -> CPUEngine:
    return CPUEngine(tiny_model, max_num_seqs=4, max_waiting=6)


def chat_ids(engine, messages, tools=None) -> list[int]:
    return list(engine.tokenizer.apply_chat_template(messages, tools=tools,
                                                     add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))


async def run(engine, ids, params):
    text, tokens, last = "", [], None
    async for d in engine.generate(ids, params):
        text += d.text
        tokens += d.token_ids
        last = d
    return text, tokens, last.finish_reason


def reference(engine, ids, n) -> list[int]:
    import torch

    out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                dtype=torch.long), max_new_tokens=n, do_sample=False,
                                pad_token_id=engine.pad_token_id)
    return out[0, len(ids):].tolist()


PROMPTS = [(tm.GREETING, None), (tm.TOOL_QUESTION, tm.TOOLS), (tm.VERSION_QUESTION, None)]


def test_greedy_output_equals_transformers_generate(engine):
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for messages, tools in PROMPTS:
        ids = chat_ids(engine, messages, tools)
        _, tokens, reason = asyncio.run(run(engine, ids, greedy))
        assert reason == "length"
        ref = reference(engine, ids, 30)  # generate stops at EOS; the engine ignored it
        assert tokens[:len(ref)] == ref
        assert len(ref) == 30 or ref[-1] in engine.eos_token_ids


def test_concurrent_staggered_requests_match_one_at_a_time(engine):
    """More requests than max_num_seqs, arriving while others decode: every sequence is the
    one it would be alone (left-padding and cache merging change nothing)."""
    greedy = SamplingParams(max_tokens=60, temperature=0)
    alone = {i: asyncio.run(run(engine, chat_ids(engine, m, t), greedy))
             for i, (m, t) in enumerate(PROMPTS)}

    async def main():
        async def delayed(k, i):
            await asyncio.sleep(0.005 * k)
            m, t = PROMPTS[i]
            return i, await run(engine, chat_ids(engine, m, t), greedy)
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.stats().running)
                await asyncio.sleep(0.001)
        w = asyncio.ensure_future(watch())
        out = await asyncio.gather(*[delayed(k, k % 3) for k in range(9)])
        w.cancel()
        return out, peak

    results, peak = asyncio.run(main())
    for i, got in results:
        assert got == alone[i]
    assert 1 < peak <= engine.max_num_seqs
    assert alone[0][0] == tm.GREETING_REPLY and alone[2][0] == tm.version_reply("1")


def test_stop_strings_are_cut_and_never_leak_across_deltas(engine):
    ids = chat_ids(engine, tm.GREETING)
    text, _, reason = asyncio.run(run(engine, ids, SamplingParams(
        max_tokens=60, temperature=0, stop=["help you", "zzz"])))
    assert (text, reason) == (tm.GREETING_REPLY.split("help you")[0], "stop")


def test_seed_makes_sampling_reproducible(engine):
    ids = chat_ids(engine, tm.GREETING)
    p = SamplingParams(max_tokens=15, temperature=1.5, top_p=0.9, seed=11, ignore_eos=True)
    a = asyncio.run(run(engine, ids, p))
    b = asyncio.run(run(engine, ids, p))
    assert a == b and len(a[1]) == 15


def test_context_and_budget_limits_are_400s(engine):
    with pytest.raises(EngineError) as err:
        engine.check(list(range(5)) * 200, SamplingParams())
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    context = engine.max_model_len
    with pytest.raises(EngineError, match=f"maximum context length is {context}"):
        engine.check([1, 2, 3], SamplingParams(max_tokens=2 * context))
    assert engine.check([1, 2, 3], SamplingParams()) == context - 3


def test_cancelled_stream_leaves_the_batch(engine):
    async def main():
        ids = chat_ids(engine, tm.GREETING)
        gen = engine.generate(ids, SamplingParams(max_tokens=200, temperature=0,
                                                  ignore_eos=True))
        seen = 0
        async for _ in gen:
            seen += 1
            if seen == 3:
                break
        await gen.aclose()
        before = engine.stats().aborted
        for _ in range(100):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        return before, engine.stats()

    aborted, stats = asyncio.run(main())
    assert aborted >= 1 and stats.running == 0


def test_full_queue_is_overloaded_503(tiny_model):
    """One running and one waiting fill an engine with max_num_seqs 1 and max_waiting 1: of
    three simultaneous requests at least one is refused with a retryable 503; none hangs."""
    small = CPUEngine(tiny_model, max_num_seqs=1, max_waiting=1)

    async def main():
        ids = chat_ids(small, tm.GREETING)
        p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        return await asyncio.wait_for(asyncio.gather(
            *[run(small, ids, p) for _ in range(3)], return_exceptions=True), timeout=60)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, EngineOverloaded)]
    served = [r for r in results if isinstance(r, tuple)]
    assert refused and served and len(refused) + len(served) == 3
    assert all(r.status == 503 and r.retry_after for r in refused)
    assert all(len(tokens) == 20 for _, tokens, _ in served)


def test_coalesced_stream_has_fewer_deltas_and_the_same_text(engine):
    """What a streaming replica does: the first token at once, then batches."""
    ids = chat_ids(engine, tm.GREETING)
    greedy = SamplingParams(max_tokens=60, temperature=0)

    async def main(coalesce):
        deltas = [d async for d in engine.generate(ids, greedy, coalesce_s=coalesce)]
        return "".join(d.text for d in deltas), len(deltas), \
            sum(len(d.token_ids) for d in deltas), deltas[0].token_ids

    per_token = asyncio.run(main(0.0))
    batched = asyncio.run(main(0.05))
    at_end = asyncio.run(main(float("inf")))
    assert per_token[0] == batched[0] == at_end[0] == tm.GREETING_REPLY
    # the same tokens however delivered (without coalescing a reader gets a delta per step,
    # or what the steps made since its last read when it is the slower one)
    assert per_token[2] == batched[2] == at_end[2] >= per_token[1]
    assert batched[1] < per_token[1] and at_end[1] == 2
    assert len(batched[3]) == len(at_end[3]) == 1  # the first token is never held back


def test_coalescing_starts_after_the_first_visible_text(engine):
    """A first token without text (here: held back as the start of a stop string) does not
    make the client wait ``coalesce_s`` for the text that follows it."""
    ids = chat_ids(engine, tm.GREETING)
    # The text of the reply's first token, held back whole by a stop string it starts.
    first, _, _ = asyncio.run(run(engine, ids, SamplingParams(max_tokens=1, temperature=0)))
    assert first and tm.GREETING_REPLY.startswith(first)
    budget = engine.max_model_len - len(ids) - 1
    held = SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True,
                          stop=[first + "\x00never"])

    async def until_text() -> list:
        deltas = []
        gen = engine.generate(ids, held, coalesce_s=30.0)
        async for d in gen:
            deltas.append(d)
            if d.text:
                break
        await gen.aclose()
        return deltas

    deltas = asyncio.run(until_text())
    # The textless first delta reaches the client on its own unless the client reads late,
    # when the engine hands it over merged with the next ones (seen on a loaded CI machine).
    assert all(d.text == "" for d in deltas[:-1]) and deltas[-1].text.startswith(first), deltas
    # The text came with the next token or so, not with the rest of the generation.
    assert sum(len(d.token_ids) for d in deltas) < min(20, budget // 4), \
        [len(d.token_ids) for d in deltas]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_step_thread_is_named_for_the_os(engine):
    """Operators (top -H, ps -L) and the benchmark's CPU meter find the model's thread by
    its OS name among the replica's threads."""
    asyncio.run(run(engine, chat_ids(engine, tm.GREETING), SamplingParams(max_tokens=2)))
    names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
    assert "cpu-engine" in names


def test_failed_step_fails_its_requests_and_the_engine_goes_on(tiny_model):
    """A step that raises (a bad kernel, out of memory) loses its batch: those requests get
    a 500 at once instead of hanging, and the next request is served normally."""
    engine = CPUEngine(tiny_model, max_num_seqs=4)
    step, failed = engine._step, []

    def failing_once(admitted):
        if not failed:
            failed.append(True)
            raise RuntimeError("kernel exploded")
        return step(admitted)

    engine._step = failing_once
    ids = chat_ids(engine, tm.GREETING)
    params = SamplingParams(max_tokens=5, temperature=0)
    with pytest.raises(EngineError) as err:
        asyncio.run(run(engine, ids, params))
    assert err.value.status == 500 and "kernel exploded" in str(err.value)
    text, tokens, reason = asyncio.run(run(engine, ids, params))
    assert reason in ("stop", "length") and tokens
    assert engine.failure() is None


def test_dead_engine_loop_fails_open_requests_and_the_health_check(tiny_model):
    """A bug that kills the step thread: the open request gets a 500 instead of hanging,
    new ones a retryable 503, and ``failure()`` (the replica's health check) says why, so
    Serve replaces the replica."""
    engine = CPUEngine(tiny_model, max_num_seqs=4)

    def broken(results):
        raise SystemError("bug in the hand-over")

    engine._hand_over = broken
    ids = chat_ids(engine, tm.GREETING)
    params = SamplingParams(max_tokens=5)
    with pytest.raises(EngineError) as err:
        asyncio.run(asyncio.wait_for(run(engine, ids, params), 10))
    assert err.value.status == 500 and "bug in the hand-over" in str(err.value)
    engine._thread.join(5)
    assert "SystemError" in (engine.failure() or "")
    with pytest.raises(EngineOverloaded):
        asyncio.run(run(engine, ids, params))


def test_cpu_engine_implements_the_engine_protocol(engine):
    """CPUEngine is an ``Engine`` (what OpenAIServing and the model deployment use), with the
    protocol's signatures, not only its names."""
    import inspect

    from serve.engines.base import Engine, EngineStats

    assert isinstance(engine, Engine)
    for name, member in vars(Engine).items():
        if name.startswith("_") or not callable(member):
            continue
        want = inspect.signature(member)
        got = inspect.signature(getattr(CPUEngine, name))
        assert list(got.parameters) == list(want.parameters), name
        assert [p.kind for p in got.parameters.values()] == \
            [p.kind for p in want.parameters.values()], name
        assert inspect.iscoroutinefunction(getattr(CPUEngine, name)) == \
            inspect.iscoroutinefunction(member), name
    assert isinstance(engine.stats(), EngineStats)
    assert isinstance(engine.max_model_len, int) and engine.has_chat_template
