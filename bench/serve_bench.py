"""Serving benchmark, after ``vllm bench serve``: concurrent clients over real HTTP with the
official ``openai`` client, streaming, reporting request throughput, output tokens/s, TTFT,
ITL, TPOT and end-to-end latency (p50/p99) and failures -- and, in the same run, the baselines:

- ``in-process``: the CPU engine called in this process, one request at a time;
- ``fastapi``: a plain FastAPI + ``transformers.generate`` server (a subprocess, streaming with
  ``TextIteratorStreamer``, one ``generate`` per request, no batching);
- ``serve/router`` and ``serve/direct``: the rayplane app deployed on the local platform
  (``rayplane up`` first; its Serve ingress, HAProxy or Ray's proxy, is printed) in each
  ingress mode (``--ingress``), beside ``serve.testing:floor_app``, an empty deployment whose
  latency is Serve's own floor on this cluster;
- the batching ceiling: the engine's decode step run directly on 1 and on 16 sequences, the
  most any server of this engine can gain from batching on this machine;
- where the CPU goes at 16 clients (``CpuMeter``, Linux): cores used by the engine thread, the
  replica's other threads, the ingress, HAProxy, the clients and the rest of the machine, and
  the machine's CPU per output token.

Every request asks for the same chat prompt and exactly ``--max-tokens`` tokens (``ignore_eos``,
greedy), so the systems do the same work; output tokens are counted from ``usage``.

    .venv/bin/python bench/serve_bench.py [--model FOLDER|models:/NAME@alias] [--json out.json]

Without ``--model`` it builds a model of the demo's size (4 layers, 128 wide; serve/testing.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"}]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


@dataclass
class Summary:
    system: str
    concurrency: int
    stream: bool
    requests: int
    failures: int
    duration_s: float
    request_throughput: float
    output_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    tpot_ms_p50: float
    e2e_ms_p50: float
    e2e_ms_p99: float
    errors: list[str]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(system: str, concurrency: int, stream: bool, results: list[RequestResult],
              duration: float) -> Summary:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    ms = 1000.0
    return Summary(
        system=system, concurrency=concurrency, stream=stream, requests=len(results),
        failures=len(results) - len(ok), duration_s=round(duration, 3),
        request_throughput=round(len(ok) / duration, 3),
        output_tokens_per_s=round(tokens / duration, 1),
        ttft_ms_p50=round(pct([r.ttft for r in ok], 50) * ms, 2),
        ttft_ms_p99=round(pct([r.ttft for r in ok], 99) * ms, 2),
        itl_ms_p50=round(pct(itl, 50) * ms, 3), itl_ms_p99=round(pct(itl, 99) * ms, 3),
        tpot_ms_p50=round(pct(tpot, 50) * ms, 3),
        e2e_ms_p50=round(pct([r.e2e for r in ok], 50) * ms, 2),
        e2e_ms_p99=round(pct([r.e2e for r in ok], 99) * ms, 2),
        errors=sorted({r.error for r in results if not r.ok})[:5])


# -- clients ---------------------------------------------------------------------------------


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
    from serve.engines.cpu import _Seq

    ids = prompt_ids(engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def step_ms(b: int) -> float:
        seqs = [_Seq(request_id=str(i), prompt_ids=ids, params=params, max_tokens=max_tokens,
                     queue=None, generator=None) for i in range(b)]
        engine._step(seqs)  # prefill
        steps, start = 0, time.perf_counter()
        while engine._rows:
            engine._step([])
            steps += 1
        return (time.perf_counter() - start) * 1000 / steps

    one = min(step_ms(1) for _ in range(rounds))
    many = min(step_ms(batch) for _ in range(rounds))
    return {"step_ms_1": round(one, 3), f"step_ms_{batch}": round(many, 3),
            "gain": round(batch * one / many, 2)}


# -- where the CPU goes ----------------------------------------------------------------------


def _ticks(path: str) -> int:
    """utime + stime of /proc/PID/stat or /proc/PID/task/TID/stat, in clock ticks."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """CPU time spent while a Serve run is measured, by part, from Linux's ``/proc``: the
    clients (this process), the model replica's engine thread and its other threads (HTTP,
    Serve, Ray), the ingress replica (``router`` mode), HAProxy, and the rest of the machine
    (Ray's own processes, the OS). With the run's output tokens it gives the CPU one token
    costs end to end, which says how many cores a tokens/s goal needs on this machine.
    ``result()`` is None where ``/proc`` is not there."""

    def __init__(self, app: str):
        self.replica_prefix = f"ray::ServeReplica:{app}:"
        self.ok = Path("/proc/stat").exists()
        self._start: dict | None = None
        self._end: dict | None = None

    def _snapshot(self) -> dict:
        parts = dict.fromkeys(("engine thread", "model replica, other threads",
                               "ingress replica", "haproxy"), 0)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                cmd = raw.replace(b"\0", b" ").decode(errors="replace")
                if cmd.startswith(self.replica_prefix + "model-"):
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
                        part = ("engine thread" if name.startswith("cpu-engine")
                                else "model replica, other threads")
                        parts[part] += _ticks(f"/proc/{pid}/task/{tid}/stat")
                elif cmd.startswith(self.replica_prefix):
                    parts["ingress replica"] += _ticks(f"/proc/{pid}/stat")
                elif "/haproxy " in cmd:
                    parts["haproxy"] += _ticks(f"/proc/{pid}/stat")
            except (OSError, IndexError, ValueError):  # a process that just exited
                continue
        hz = os.sysconf("SC_CLK_TCK")
        seconds = {k: v / hz for k, v in parts.items()}
        own = os.times()
        seconds["clients (openai, this process)"] = own.user + own.system
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        seconds["machine"] = (sum(cpu) - cpu[3] - cpu[4]) / hz
        seconds["wall"] = time.monotonic()
        return seconds

    def __enter__(self) -> CpuMeter:
        if self.ok:
            self._start = self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        if self.ok:
            self._end = self._snapshot()

    def result(self, summary: Summary) -> dict | None:
        """Cores each part used on average, and CPU ms per output token."""
        if self._start is None or self._end is None:
            return None
        used = {k: self._end[k] - self._start[k] for k in self._start}
        wall = used.pop("wall")
        machine = used.pop("machine")
        used["rest of the machine (Ray, OS)"] = max(0.0, machine - sum(used.values()))
        tokens = summary.output_tokens_per_s * summary.duration_s
        return {"cores": {k: round(v / wall, 2) for k, v in used.items()},
                "machine_cores_busy": round(machine / wall, 2),
                "machine_cpu_ms_per_token": round(machine * 1000 / tokens, 4) if tokens else None,
                "cpus": os.cpu_count()}


# -- the plain FastAPI + transformers.generate baseline ------------------------------------


def fastapi_server(model_dir: str, port: int) -> None:
    """What many teams first write: one ``generate`` per request in a thread, streamed with
    ``TextIteratorStreamer``. OpenAI-shaped enough for the openai client."""
    import threading
    import uuid

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        n = int(body.get("max_tokens") or 64)
        kw = {"max_new_tokens": n, "do_sample": False, "pad_token_id": tok.pad_token_id}
        if body.get("ignore_eos"):
            kw["min_new_tokens"] = n
        prompt_len = ids["input_ids"].shape[1]
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]

        def usage(out_len: int) -> dict:
            return {"prompt_tokens": prompt_len, "completion_tokens": out_len,
                    "total_tokens": prompt_len + out_len}

        if not body.get("stream"):
            def run():
                with torch.inference_mode():
                    return model.generate(**ids, **kw)[0, prompt_len:]
            out = await run_in_threadpool(run)
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                                 "model": name, "usage": usage(len(out)), "choices": [{
                                     "index": 0, "finish_reason": "length", "message": {
                                         "role": "assistant",
                                         "content": tok.decode(out, skip_special_tokens=True)}}]})
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        holder = {}

        def run_stream():
            with torch.inference_mode():
                holder["out"] = model.generate(**ids, streamer=streamer, **kw)[0, prompt_len:]
        thread = threading.Thread(target=run_stream, daemon=True)
        thread.start()

        def chunk(delta, finish=None):
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk",
                                          "created": created, "model": name, "choices": [
                                              {"index": 0, "delta": delta,
                                               "finish_reason": finish}]}) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            iterator = iter(streamer)
            while True:
                piece = await run_in_threadpool(next, iterator, None)
                if piece is None:
                    break
                if piece:
                    yield chunk({"content": piece})
            await run_in_threadpool(thread.join)
            yield chunk({}, "length")
            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk",
                                         "created": created, "model": name, "choices": [],
                                         "usage": usage(len(holder["out"]))}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fastapi(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, __file__, "fastapi-server", "--model",
                                 str(model_dir), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the FastAPI baseline exited: {log.read_text()[-800:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, f"{base}/v1"
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("the FastAPI baseline did not start in 180 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# -- the run -----------------------------------------------------------------------------------


def model_folder(spec: str | None, work: Path) -> Path:
    if spec is None:
        from serve.testing import make_tiny_model

        return make_tiny_model(work / "bench-model", n_layer=4, n_embd=128, n_head=4,
                               n_positions=256, steps=60)
    from serve.model_source import fetch_model

    return fetch_model(spec, cache_dir=work)


def deploy_floor_app(state_dir: Path) -> str:
    """Serve's own floor on this cluster: ``serve.testing:floor_app`` (a deployment that
    answers ``{}`` at once) behind the same proxy. Its latency is what any Serve app pays
    before doing work; the <= 5 ms goal is read against it."""
    from serve.cli import Target, merge_applications, wait_running

    target = Target(None, state_dir)
    client = target.client()
    details = client.get_serve_details()
    app = {"name": "bench-floor", "route_prefix": "/bench-floor",
           "import_path": "serve.testing:floor_app"}
    config = {**{k: details[k] for k in ("proxy_location", "http_options") if details.get(k)},
              "applications": [app]}
    client.deploy_applications(merge_applications(details, config))
    wait_running(client, "bench-floor", timeout=120)
    return f"http://127.0.0.1:{target.serve_port(8000)}/bench-floor"


def floor_ms_p50(url: str, requests: int = 40) -> float:
    """p50 of a keep-alive GET of the floor app (httpx, as the openai client uses)."""
    import httpx

    with httpx.Client(timeout=30) as client:
        client.get(url).raise_for_status()
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            client.get(url).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return round(pct(times, 50), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    srv = sub.add_parser("fastapi-server")
    srv.add_argument("--model", required=True)
    srv.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", help="Model folder or models:/NAME@alias (default: build "
                                        "a demo-size model).")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64,
                        help="Requests per concurrent run.")
    parser.add_argument("--single-requests", type=int, default=16,
                        help="Requests of the one-at-a-time runs.")
    parser.add_argument("--pool", default="a100-mig", help="Pool of the Serve replica.")
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--skip-serve", action="store_true", help="Baselines only.")
    parser.add_argument("--ingress", type=lambda v: v.split(","), default=["router", "direct"],
                        help="Serve ingress modes to measure, comma-separated.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of all systems.")
    parser.add_argument("--niceness", type=int, default=15,
                        help="Run clients and baselines at Ray workers' niceness (15).")
    args = parser.parse_args()
    if args.cmd == "fastapi-server":
        fastapi_server(args.model, args.port)
        return 0

    # Ray starts its workers (Serve's proxy and replicas among them) at niceness 15
    # (RAY_worker_niceness). On a shared machine a nice-0 baseline would get the CPU first:
    # every system and client runs at the same niceness (the FastAPI server inherits it).
    if args.niceness > os.nice(0):
        os.nice(args.niceness - os.nice(0))
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    folder = model_folder(args.model, work)
    n, c, single = args.max_tokens, args.concurrency, args.single_requests
    results: list[Summary] = []

    def report(s: Summary) -> None:
        results.append(s)
        print(f"{s.system:>12} c={s.concurrency:<3} {'stream' if s.stream else 'unary':<6} "
              f"{s.output_tokens_per_s:>8.1f} tok/s  {s.request_throughput:>6.2f} req/s  "
              f"TTFT p50 {s.ttft_ms_p50:>7.1f} ms  ITL p50 {s.itl_ms_p50:>6.2f} ms  "
              f"E2E p50 {s.e2e_ms_p50:>7.1f} p99 {s.e2e_ms_p99:>7.1f} ms  "
              f"failures {s.failures} {'; '.join(s.errors)}", flush=True)

    # The Serve app first (deploying takes a while), then rounds of all systems back to back:
    # the machine's load drifts, so each round's ratios compare runs minutes apart at most.
    from serve.engines.cpu import CPUEngine

    engine = CPUEngine(folder, max_num_seqs=c, num_threads=1)  # as a Serve replica's
    proc, fastapi_url = start_fastapi(folder, work / "fastapi.log")
    apps: dict[str, str] = {}  # ingress mode -> OpenAI base URL
    key = state_dir = floor_url = serve_proxy = None
    try:
        if not args.skip_serve:
            from raycluster.local import LocalState

            for mode in args.ingress:
                state_dir, apps[mode], key = deploy_bench_app(args, folder, work, mode)
            floor_url = deploy_floor_app(state_dir)
            serve_proxy = LocalState.load(state_dir).serve_proxy
            print(f"Serve ingress: {serve_proxy} (rayplane up --serve-proxy)", flush=True)
        rounds = []
        for r in range(args.rounds):
            print(f"-- round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})")
            row = {"in_process": asyncio.run(run_in_process(engine, num_requests=single,
                                                            max_tokens=n))}
            report(row["in_process"])
            # The engine's own batching gain, without HTTP (not a goal; shows where time goes).
            row["in_process_c"] = asyncio.run(run_in_process(
                engine, num_requests=args.requests, max_tokens=n, concurrency=c))
            report(row["in_process_c"])
            row["batching_ceiling"] = batching_ceiling(engine, max_tokens=n, batch=c)
            print(f"engine step alone (no loop, no HTTP): {row['batching_ceiling']}", flush=True)
            for conc, reqs in ((1, single), (c, args.requests)):
                row[f"fastapi_{conc}"] = asyncio.run(run_http(
                    "fastapi", fastapi_url, "none", "m", concurrency=conc, num_requests=reqs,
                    max_tokens=n))
                report(row[f"fastapi_{conc}"])
            if apps:
                # Transport alone: one output token, so the decode loop is out of the sum.
                row["in_process_1tok"] = asyncio.run(run_in_process(
                    engine, num_requests=2 * single, max_tokens=1))
                row["serve_floor_ms_p50"] = floor_ms_p50(floor_url)
                print(f"1-token in-process {row['in_process_1tok'].e2e_ms_p50:.2f} ms; Serve "
                      f"floor (an empty deployment) {row['serve_floor_ms_p50']:.2f} ms p50",
                      flush=True)
            for mode, url in apps.items():
                system = f"serve/{mode}"
                unary = row[f"{system}_unary_1"] = asyncio.run(run_http(
                    system, url, key, "tiny-chat", concurrency=1, num_requests=single,
                    max_tokens=n, stream=False))
                report(unary)
                row[f"{system}_1"] = asyncio.run(run_http(
                    system, url, key, "tiny-chat", concurrency=1, num_requests=single,
                    max_tokens=n))
                report(row[f"{system}_1"])
                with CpuMeter(f"bench-{mode}") as meter:
                    row[f"{system}_{c}"] = asyncio.run(run_http(
                        system, url, key, "tiny-chat", concurrency=c,
                        num_requests=args.requests, max_tokens=n))
                report(row[f"{system}_{c}"])
                cpu = row[f"cpu_{mode}_{c}"] = meter.result(row[f"{system}_{c}"])
                if cpu:
                    print(f"CPU at c={c} (cores): {json.dumps(cpu['cores'])}; machine "
                          f"{cpu['machine_cores_busy']} of {cpu['cpus']}, "
                          f"{cpu['machine_cpu_ms_per_token']} ms per token", flush=True)
                one_token = row[f"{system}_unary_1tok"] = asyncio.run(run_http(
                    system, url, key, "tiny-chat", concurrency=1, num_requests=2 * single,
                    max_tokens=1, stream=False))
                report(one_token)
                row[f"ratios_{mode}"] = {
                    "serve_tokens_per_s_vs_in_process_1": round(
                        row[f"{system}_{c}"].output_tokens_per_s
                        / row["in_process"].output_tokens_per_s, 2),
                    "serve_tokens_per_s_vs_fastapi": round(
                        row[f"{system}_{c}"].output_tokens_per_s
                        / row[f"fastapi_{c}"].output_tokens_per_s, 2),
                    "http_added_ms_p50_unary": round(
                        unary.e2e_ms_p50 - row["in_process"].e2e_ms_p50, 2),
                    "http_added_ms_p50_stream": round(
                        row[f"{system}_1"].e2e_ms_p50 - row["in_process"].e2e_ms_p50, 2),
                    "http_added_ms_p50_1_token": round(
                        one_token.e2e_ms_p50 - row["in_process_1tok"].e2e_ms_p50, 2),
                    "serve_floor_ms_p50": row["serve_floor_ms_p50"],
                }
                if cpu and cpu["machine_cpu_ms_per_token"]:
                    # What the 8x goal asks of this machine at this run's CPU per token.
                    row[f"ratios_{mode}"]["cores_for_8x_in_process_1"] = round(
                        8 * row["in_process"].output_tokens_per_s
                        * cpu["machine_cpu_ms_per_token"] / 1000, 2)
                print(mode, json.dumps(row[f"ratios_{mode}"]), flush=True)
            rounds.append(row)
    finally:
        stop(proc)
        if state_dir is not None:
            remove_bench_apps(state_dir)
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "niceness": os.nice(0),
               "python": platform.python_version(), "load_avg_end": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine, "model": str(args.model or "demo-size tiny GPT-2"),
            "serve_proxy": serve_proxy,
            "max_tokens": n, "concurrency": c,
            "rounds": [{k: (asdict(v) if isinstance(v, Summary) else v) for k, v in row.items()}
                       for row in rounds]}, indent=2))
    return 0 if all(r.failures == 0 for r in results) else 1


def deploy_bench_app(args, folder: Path, work: Path, mode: str):
    from raycluster.local import LocalCluster, LocalState, default_state_dir
    from serve.cli import deploy
    from serve.testing import serve_config_yaml

    state_dir = (args.state_dir or default_state_dir()).resolve()
    st = LocalState.load(state_dir)
    if st is None:
        raise SystemExit("the local platform is not up: run `rayplane up` (or --skip-serve)")
    cluster = LocalCluster(state_dir, ports=st.ports)
    cfg = work / f"serve-{mode}.yaml"
    cfg.write_text(serve_config_yaml(name=f"bench-{mode}", source=str(folder), pool=args.pool,
                                     route_prefix=f"/bench-{mode}",
                                     api_key_file=cluster.api_key_path,
                                     max_num_seqs=args.concurrency, ingress_mode=mode))
    _, base_url = deploy(cfg, state_dir=state_dir, timeout=600)
    return state_dir, base_url, cluster.api_key_path.read_text().strip()


def remove_bench_apps(state_dir: Path) -> None:
    """Remove the bench's apps, keeping the cluster's other applications."""
    from serve.cli import Target, remove_applications

    remove_applications(Target(None, state_dir).client(), lambda app: app.startswith("bench-"))


if __name__ == "__main__":
    sys.exit(main())
