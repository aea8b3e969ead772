"""Serving benchmark, after ``vllm bench serve``: concurrent clients over real HTTP with the
official ``openai`` client, streaming, reporting request throughput, output tokens/s, TTFT,
ITL, TPOT and end-to-end latency (p50/p99) and failures -- and, in the same run, the baselines:

- ``in-process``: the CPU engine called in this process, one request at a time;
- ``fastapi``: a plain FastAPI + ``transformers.generate`` server (a subprocess, streaming with
  ``TextIteratorStreamer``, one ``generate`` per request, no batching);
- ``serve/router`` and ``serve/direct``: the rayplane app deployed on the local platform
  (``rayplane up`` first; its Serve ingress, HAProxy or Ray's proxy, is printed) in each
  ingress mode (``--ingress``), beside ``bench.floor:app``, an empty deployment whose latency
  is Serve's own floor on this cluster;
- ``serve/triton`` (``--ingress router,triton``): the same model on the ``triton`` engine
  behind the router, a Triton server (nvidia-pytriton's, Python backend over the CPU engine)
  that the replica starts, spoken to over KServe v2 gRPC;
- the batching ceiling: the engine's decode step run directly on 1 and on 16 sequences, the
  most any server of this engine can gain from batching on this machine;
- where the CPU goes at 16 clients (``CpuMeter``, Linux): cores used by the engine thread, the
  replica's other threads, the ingress, HAProxy, the clients and the rest of the machine, and
  the machine's CPU per output token.

Every request asks for the same chat prompt and exactly ``--max-tokens`` tokens (``ignore_eos``,
greedy), so the systems do the same work; output tokens are counted from ``usage``.

    .venv/bin/python bench/serve_bench.py [--model FOLDER|models:/NAME@alias] [--json out.json]

Without ``--model`` it builds a model of the demo's size (bench/model.py). The parts:
bench/load.py (the clients), bench/in_process.py (the engine without HTTP), bench/cpu_meter.py,
bench/fastapi_baseline.py, bench/serve_deploy.py (the apps on the local platform),
bench/stats.py (the summaries), bench/guard.py (what keeps it safe to run).

Before deploying anything it checks that ``--pool`` has a free unit per app (one per
``--ingress`` mode; leftover ``bench-*`` apps count as free and are removed first) and else
exits at once (code 2) with one line naming the apps that hold the units and the
``rayplane serve down`` that frees them. Each wait is bounded (``--deploy-timeout``, each
run's budget from requests x max tokens), and on any exit, SIGTERM/SIGINT included, it stops
the FastAPI server (which also dies with a SIGKILLed bench) and removes its ``bench-*`` apps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without the editable install
    sys.path.insert(0, str(REPO))

from bench.cpu_meter import CpuMeter  # noqa: E402
from bench.fastapi_baseline import start_fastapi, stop  # noqa: E402
from bench.guard import (  # noqa: E402
    PREFIX,
    Cleanup,
    Fail,
    TimeUp,
    bounded,
    hold_lock,
    read_pool_units,
    stuck_line,
    units_line,
)
from bench.in_process import batching_ceiling, run_in_process  # noqa: E402
from bench.load import RunTimeout, run_http  # noqa: E402
from bench.serve_deploy import (  # noqa: E402
    MODEL,
    attach,
    deploy_bench_app,
    deploy_floor_app,
    floor_ms_p50,
    remove_bench_apps,
)
from bench.stats import Summary  # noqa: E402
from raycluster.errors import PlatformError  # noqa: E402
from raycluster.spec import SpecError  # noqa: E402
from serve.deploy import client, first_line  # noqa: E402


def model_folder(spec: str | None, work: Path) -> Path:
    if spec is None:
        from bench.model import demo_size_model

        return demo_size_model(work / "bench-model")
    from serve.engines.model_source import fetch_model

    return fetch_model(spec, cache_dir=work)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
                        help="Serve apps to measure, comma-separated: router, direct (the cpu "
                             "engine's ingress modes), triton (the triton engine, router).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of all systems.")
    parser.add_argument("--deploy-timeout", type=float, default=300,
                        help="Seconds each Serve app may take to be RUNNING.")
    parser.add_argument("--niceness", type=int, default=15,
                        help="Run clients and baselines at Ray workers' niceness (15).")
    return parser.parse_args(argv)


class Reporter:
    """Prints each run's line and keeps the runs (the exit code: no failures)."""

    def __init__(self):
        self.results: list[Summary] = []

    def __call__(self, s: Summary) -> Summary:
        self.results.append(s)
        print(f"{s.system:>12} c={s.concurrency:<3} {'stream' if s.stream else 'unary':<6} "
              f"{s.output_tokens_per_s:>8.1f} tok/s  {s.request_throughput:>6.2f} req/s  "
              f"TTFT p50 {s.ttft_ms_p50:>7.1f} ms  ITL p50 {s.itl_ms_p50:>6.2f} ms  "
              f"E2E p50 {s.e2e_ms_p50:>7.1f} p99 {s.e2e_ms_p99:>7.1f} ms  "
              f"failures {s.failures} {'; '.join(s.errors)}", flush=True)
        return s


def baselines(row: dict, engine, fastapi_url: str, args, report: Reporter) -> None:
    """The in-process engine, its batching ceiling and the FastAPI baseline, into ``row``."""
    n, c, single = args.max_tokens, args.concurrency, args.single_requests
    row["in_process"] = report(asyncio.run(run_in_process(engine, num_requests=single,
                                                          max_tokens=n)))
    # The engine's own batching gain, without HTTP (not a goal; shows where time goes).
    row["in_process_c"] = report(asyncio.run(run_in_process(
        engine, num_requests=args.requests, max_tokens=n, concurrency=c)))
    row["batching_ceiling"] = batching_ceiling(engine, max_tokens=n, batch=c)
    print(f"engine step alone (no loop, no HTTP): {row['batching_ceiling']}", flush=True)
    for conc, reqs in ((1, single), (c, args.requests)):
        row[f"fastapi_{conc}"] = report(asyncio.run(run_http(
            "fastapi", fastapi_url, "none", "m", concurrency=conc, num_requests=reqs,
            max_tokens=n)))


def serve_runs(row: dict, mode: str, url: str, key: str, args, report: Reporter) -> None:
    """The Serve app in ingress ``mode``, its CPU split and its ratios, into ``row``."""
    n, c, single = args.max_tokens, args.concurrency, args.single_requests
    system = f"serve/{mode}"
    unary = row[f"{system}_unary_1"] = report(asyncio.run(run_http(
        system, url, key, MODEL, concurrency=1, num_requests=single, max_tokens=n,
        stream=False)))
    row[f"{system}_1"] = report(asyncio.run(run_http(
        system, url, key, MODEL, concurrency=1, num_requests=single, max_tokens=n)))
    with CpuMeter(f"bench-{mode}") as meter:
        row[f"{system}_{c}"] = asyncio.run(run_http(
            system, url, key, MODEL, concurrency=c, num_requests=args.requests, max_tokens=n))
    report(row[f"{system}_{c}"])
    cpu = row[f"cpu_{mode}_{c}"] = meter.result(row[f"{system}_{c}"])
    if cpu:
        print(f"CPU at c={c} (cores): {json.dumps(cpu['cores'])}; machine "
              f"{cpu['machine_cores_busy']} of {cpu['cpus']}, "
              f"{cpu['machine_cpu_ms_per_token']} ms per token, of which the serving path "
              f"(all but the engine thread) {cpu['serving_path_ms_per_token']}", flush=True)
    one_token = row[f"{system}_unary_1tok"] = report(asyncio.run(run_http(
        system, url, key, MODEL, concurrency=1, num_requests=2 * single, max_tokens=1,
        stream=False)))
    ratios = row[f"ratios_{mode}"] = {
        # Issue 16's goals: >= 0.8 (direct) / 0.7 (router); the serving path's CPU per token
        # <= 0.1 / 0.15 ms; one token through Serve <= +5 ms p50 (http_added_ms_p50_1_token).
        "serve_tokens_per_s_vs_in_process_16": round(
            row[f"{system}_{c}"].output_tokens_per_s
            / row["in_process_c"].output_tokens_per_s, 2),
        "serving_path_ms_per_token": (cpu or {}).get("serving_path_ms_per_token"),
        "serve_tokens_per_s_vs_in_process_1": round(
            row[f"{system}_{c}"].output_tokens_per_s / row["in_process"].output_tokens_per_s,
            2),
        "serve_tokens_per_s_vs_fastapi": round(
            row[f"{system}_{c}"].output_tokens_per_s / row[f"fastapi_{c}"].output_tokens_per_s,
            2),
        "http_added_ms_p50_unary": round(unary.e2e_ms_p50 - row["in_process"].e2e_ms_p50, 2),
        "http_added_ms_p50_stream": round(
            row[f"{system}_1"].e2e_ms_p50 - row["in_process"].e2e_ms_p50, 2),
        "http_added_ms_p50_1_token": round(
            one_token.e2e_ms_p50 - row["in_process_1tok"].e2e_ms_p50, 2),
        "serve_floor_ms_p50": row["serve_floor_ms_p50"],
    }
    if cpu and cpu["machine_cpu_ms_per_token"]:
        # What the 8x goal asks of this machine at this run's CPU per token.
        ratios["cores_for_8x_in_process_1"] = round(
            8 * row["in_process"].output_tokens_per_s * cpu["machine_cpu_ms_per_token"] / 1000,
            2)
    print(mode, json.dumps(ratios), flush=True)


def check_units(args) -> str:
    """Fail (one line) unless ``--pool`` has a free unit for each app, before anything is
    deployed or built; then remove the ``bench-*`` apps an earlier, killed run left (counted
    as free). Returns the platform's Serve ingress (HAProxy or Ray's proxy)."""
    cluster, target = attach(args.state_dir)
    args.lock = hold_lock(cluster.state_dir / "serve_bench.lock")
    units = read_pool_units(cluster, target, args.pool, "serve_bench", need=len(args.ingress))
    if units.pool.has_gpu:  # a model replica there takes one unit (on a CPU pool, its cores)
        line = units_line(args.pool, args.ingress, units.total, units.free, units.held,
                          args.state_dir)
        if line:
            raise Fail(line)
    leftovers = [a for a in units.details.get("applications") or {} if a.startswith(PREFIX)]
    if leftovers:
        print(f"serve_bench: removing {', '.join(leftovers)} (left by an earlier run)",
              flush=True)
        try:
            with bounded(180, f"removing {', '.join(leftovers)}"):
                remove_bench_apps(args.state_dir)
        except Exception as err:  # noqa: BLE001 - as above
            raise Fail(f"serve_bench: {first_line(str(err))}") from None
    return cluster.serve_proxy


def deploy_apps(args, folder: Path) -> tuple[dict[str, str], str, str]:
    """The bench's apps, each RUNNING within ``--deploy-timeout`` s, else Fail with one line
    from Serve's details (what its replicas wait for): (mode -> base URL, API key, floor
    URL)."""
    apps: dict[str, str] = {}
    key = floor_url = ""
    for mode in [*args.ingress, "floor"]:
        name = f"{PREFIX}{mode}"
        try:
            with bounded(args.deploy_timeout, f"deploying {name}"):
                if mode == "floor":
                    floor_url = deploy_floor_app(args.state_dir, timeout=args.deploy_timeout)
                else:
                    apps[mode], key = deploy_bench_app(args.state_dir, folder, mode,
                                                       pool=args.pool,
                                                       max_num_seqs=args.concurrency)
        except (PlatformError, SpecError) as err:  # a failed replica, a bad config: one line
            raise Fail(f"serve_bench: {err}") from None
        except TimeUp:
            try:
                with bounded(30, "reading Serve's details"):
                    details = client(attach(args.state_dir)[1]).get_serve_details()
            except Exception as err:  # noqa: BLE001 - the line says so instead
                raise Fail(f"serve_bench: {name} is not RUNNING after "
                           f"{args.deploy_timeout:.0f}s; Serve's details: "
                           f"{first_line(str(err))}") from None
            raise Fail(stuck_line(details, name, args.deploy_timeout)) from None
    return apps, key, floor_url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cleanup = Cleanup()
    cleanup.install()
    try:
        return bench(args, cleanup)
    except (Fail, RunTimeout) as err:
        print(err, file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup.run()


def bench(args, cleanup: Cleanup) -> int:
    serve_proxy = None
    if not args.skip_serve:
        serve_proxy = check_units(args)
        cleanup.add("removing the bench-* Serve apps", lambda: remove_bench_apps(args.state_dir),
                    timeout=180)
    # Ray starts its workers (Serve's proxy and replicas among them) at niceness 15
    # (RAY_worker_niceness). On a shared machine a nice-0 baseline would get the CPU first:
    # every system and client runs at the same niceness (the FastAPI server inherits it).
    if args.niceness > os.nice(0):
        os.nice(args.niceness - os.nice(0))
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    # After the FastAPI server stops (steps run last added first): the built model and the
    # server's log would otherwise stay in /tmp, one folder per run.
    cleanup.add("removing the work folder", lambda: shutil.rmtree(work, ignore_errors=True))
    folder = model_folder(args.model, work)
    report = Reporter()

    # The Serve apps first (deploying takes a while), then rounds of all systems back to back:
    # the machine's load drifts, so each round's ratios compare runs minutes apart at most.
    from serve.engines.cpu import CPUEngine

    engine = CPUEngine(folder, max_num_seqs=args.concurrency, num_threads=1)  # as a replica's
    proc, fastapi_url = start_fastapi(folder, work / "fastapi.log")
    cleanup.add("stopping the FastAPI baseline", lambda: stop(proc), timeout=30)
    apps: dict[str, str] = {}  # ingress mode -> OpenAI base URL
    key = floor_url = None
    rounds = []
    if not args.skip_serve:
        apps, key, floor_url = deploy_apps(args, folder)
        print(f"Serve ingress: {serve_proxy} (rayplane up --serve-proxy)", flush=True)
    for r in range(args.rounds):
        print(f"-- round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})")
        row: dict = {}
        baselines(row, engine, fastapi_url, args, report)
        if apps:
            # Transport alone: one output token, so the decode loop is out of the sum.
            row["in_process_1tok"] = asyncio.run(run_in_process(
                engine, num_requests=2 * args.single_requests, max_tokens=1))
            try:
                row["serve_floor_ms_p50"] = floor_ms_p50(floor_url)
            except (TimeoutError, httpx.HTTPError) as err:
                raise Fail(f"serve_bench: the floor app: {err}") from None
            print(f"1-token in-process {row['in_process_1tok'].e2e_ms_p50:.2f} ms; Serve "
                  f"floor (an empty deployment) {row['serve_floor_ms_p50']:.2f} ms p50",
                  flush=True)
        for mode, url in apps.items():
            serve_runs(row, mode, url, key, args, report)
        if "triton" in apps and "router" in apps:
            c = args.concurrency
            row["triton_vs_cpu"] = {
                "tokens_per_s": round(row[f"serve/triton_{c}"].output_tokens_per_s
                                      / row[f"serve/router_{c}"].output_tokens_per_s, 2),
                "ttft_ms_p50": round(row[f"serve/triton_{c}"].ttft_ms_p50
                                     - row[f"serve/router_{c}"].ttft_ms_p50, 1)}
            print(f"triton vs cpu engine (router, c={c}): "
                  f"{json.dumps(row['triton_vs_cpu'])}", flush=True)
        rounds.append(row)
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "niceness": os.nice(0),
               "python": platform.python_version(), "load_avg_end": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine, "model": str(args.model or "demo-size GPT-2"),
            "serve_proxy": serve_proxy,
            "max_tokens": args.max_tokens, "concurrency": args.concurrency,
            "rounds": [{k: (asdict(v) if isinstance(v, Summary) else v) for k, v in row.items()}
                       for row in rounds]}, indent=2))
    return 0 if all(r.failures == 0 for r in report.results) else 1


if __name__ == "__main__":
    sys.exit(main())
