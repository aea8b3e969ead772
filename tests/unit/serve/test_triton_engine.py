"""The triton engine against a real Triton server (nvidia-pytriton's bundled ``tritonserver``,
installed by ``make`` into .triton/) without Ray: the server the engine starts, the KServe v2
stream it speaks, cancellation, Triton's own metrics, a dead server, and the watchdog that
stops a server whose replica was killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve.protocol import ChatCompletionRequest
from tests.support import tiny_model as tm
from tests.support.procs import pids_with

try:
    from serve.engines.triton_server import TritonUnavailable, triton_root

    triton_root()
except TritonUnavailable as err:  # pragma: no cover - only where `make env` did not run
    pytest.skip(str(err), allow_module_level=True)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engine():
    from serve.engines.triton import TritonEngine

    engine = TritonEngine(tm.cached_tiny_model("1"), url=None, model_name="llm",
                          label="unit", stream_interval_ms=0)
    yield engine
    engine.process.stop()


def serving(engine):
    from serve.serving import OpenAIServing

    return OpenAIServing(engine, "tiny", engine_kind="triton")


def test_greedy_answer_usage_and_stream_match_the_cpu_engine(engine):
    async def main():
        s = serving(engine)
        full = await s.chat(ChatCompletionRequest(model="tiny", messages=tm.GREETING,
                                                  temperature=0, max_tokens=60), "a")
        lines = [line async for line in s.chat_stream(ChatCompletionRequest(
            model="tiny", messages=tm.GREETING, temperature=0, max_tokens=60, stream=True),
            "b")]
        return full, lines

    full, lines = asyncio.run(main())
    assert full["choices"][0]["message"]["content"] == tm.GREETING_REPLY
    assert full["choices"][0]["finish_reason"] == "stop"
    text = engine.tokenizer.encode(tm.GREETING_REPLY, add_special_tokens=False)
    assert full["usage"]["completion_tokens"] == len(text) + 1  # EOS counted, as vLLM does
    assert lines[-1].endswith("data: [DONE]\n\n") and len(lines) > 4  # token by token
    assert card_of(engine)["engine"] == "triton"


def card_of(engine) -> dict:
    return serving(engine).model_card().model_dump()


def test_a_closed_stream_cancels_the_sequence_on_the_server(engine):
    async def main():
        before = engine.stats().aborted
        gen = serving(engine).chat_stream(ChatCompletionRequest(
            model="tiny", messages=tm.GREETING, temperature=0, max_tokens=400, stream=True,
            ignore_eos=True), "c")
        for _ in range(3):
            await gen.__anext__()
        await gen.aclose()
        return before

    before = asyncio.run(main())
    stats = engine.stats()
    assert stats.aborted == before + 1 and stats.running == 0


def test_tritons_own_metrics_count_the_requests(engine):
    text = httpx.get(f"http://127.0.0.1:{engine.process.ports['metrics']}/metrics",
                     timeout=10).text
    line = next(x for x in text.splitlines()
                if x.startswith('nv_inference_request_success{model="llm"'))
    assert float(line.rsplit(" ", 1)[1]) >= 2


def test_a_dead_server_fails_health_and_requests_with_a_retryable_503(engine):
    """Last of the module's tests on ``engine``: its server is killed here."""
    from serve.engines.base import EngineError

    (server,) = pids_with(str(engine.process.work), exe="tritonserver")
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.failure() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "tritonserver" in (engine.failure() or "")

    async def ask():
        return await serving(engine).chat(ChatCompletionRequest(
            model="tiny", messages=tm.GREETING, max_tokens=3), "d")

    with pytest.raises(EngineError) as err:
        asyncio.run(ask())
    assert err.value.status == 503 and err.value.code == "triton_unavailable"
    assert err.value.retry_after


OWNER = """
import sys, time
from serve.engines.triton_server import TritonProcess
p = TritonProcess("llm", sys.argv[1], max_num_seqs=4, max_model_len=None,
                  stream_interval_ms=0, label="orphan")
p.start(120)
print(p.work, flush=True)
time.sleep(600)
"""


def test_the_server_of_a_killed_replica_stops_and_its_files_go():
    """A replica killed outright runs no cleanup: the watchdog around its server does it."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tm.cached_tiny_model("1"))],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[3])
    try:
        work = owner.stdout.readline().strip()
        assert work and pids_with(work, exe="tritonserver")
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 20
    while pids_with(work, exe="tritonserver") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pids_with(work, exe="tritonserver")
    while Path(work).exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(work).exists()


def test_finish_reasons_of_both_backends_are_read_alike():
    """rayplane's Python backend sends "" while a sequence runs, the vLLM backend the string
    "None"; either ends with stop or length, and vLLM's abort fails the request."""
    from serve.engines.base import EngineError
    from serve.engines.triton import finish_reason

    assert [finish_reason(r, "m") for r in (b"", b"None", b"stop", b"length")] == \
        [None, None, "stop", "length"]
    with pytest.raises(EngineError) as err:
        finish_reason(b"abort", "m")
    assert err.value.status == 500 and "abort" in err.value.message
