"""One serving lever's effect alone, before and after in the same run (issue 16).

Two copies of the bench's app (``bench/serve_deploy.py``) run side by side on the local
platform, the same model in the same ingress mode, one replica each on the pool's two units:
``bench-<mode>-before`` and ``bench-<mode>-after``, which differ in one thing only:

- a Ray Serve setting (``--lever NAME``, the table below; ``--before-env``/``--after-env``
  for any other): an environment variable of the application's ``runtime_env``, which Serve
  reads when the replica starts;
- rayplane's own code (``--before-ref``/``--after-ref``): the replica imports the ``serve``
  package of that git revision (a worktree of it on the replica's ``PYTHONPATH``), so a change
  is measured against its parent with everything else equal;
- a model field (``--before-model``/``--after-model k=v``, e.g. ``stream_interval_ms=100``).

Each round measures both, in alternating order (the machine's load drifts): 16 streaming
clients (the bench's clients, tokens/s, and the CPU meter's breakdown: the machine's CPU per
output token and the part of it that is not the engine thread, the issue's "serving path"),
then one client asking for one token (unary, end-to-end p50), and the CPU engine in this
process at 16 (the goal's baseline). Printed per round, then a markdown table of the rounds
(docs/benchmarks.md keeps them).

    rayplane up
    .venv/bin/python bench/serve_levers.py --lever user-code-on-loop --mode direct --rounds 3
    .venv/bin/python bench/serve_levers.py --before-ref HEAD~1 --after-ref HEAD --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without the editable install
    sys.path.insert(0, str(REPO))

from bench.cpu_meter import CpuMeter  # noqa: E402
from bench.guard import PREFIX, Fail, hold_lock, read_pool_units  # noqa: E402
from bench.in_process import run_in_process  # noqa: E402
from bench.load import run_http  # noqa: E402
from bench.serve_deploy import (  # noqa: E402
    MODEL,
    Variant,
    attach,
    deploy_variants,
    remove_bench_apps,
)

#: Ray Serve's per-request switches at Ray's defaults (ray/serve/_private/constants.py), the
#: "before" of every Serve lever: each is then measured alone, whatever rayplane renders
#: (serve.builder.SERVE_REPLICA_ENV, which turns the winners on, is one more lever).
RAY_DEFAULTS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
                "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
                "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
                "RAY_SERVE_LOG_TO_STDERR": "1",
                "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}


def _lever(doc: str, **after: str) -> tuple[dict[str, str], dict[str, str], str]:
    return RAY_DEFAULTS, {**RAY_DEFAULTS, **after}, doc


def _levers() -> dict[str, tuple[dict[str, str], dict[str, str], str]]:
    from serve.builder import SERVE_REPLICA_ENV

    return {
        # Serve reads its switches without the umbrella's defaults once it is on.
        "throughput-optimized": (RAY_DEFAULTS, {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
                                 "all of Serve's throughput settings together"),
        "rayplane-serve-env": _lever("the Serve settings rayplane renders (SERVE_REPLICA_ENV)",
                                     **SERVE_REPLICA_ENV),
        "user-code-on-loop": _lever("the app's code on the replica's event loop, not a thread "
                                    "of its own",
                                    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="0"),
        "log-buffer": _lever("request-path log lines written 1000 at a time",
                             RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE="1000"),
        "no-stderr-log": _lever("replica logs to their file only, not also to stderr",
                                RAY_SERVE_LOG_TO_STDERR="0"),
        "router-same-loop": _lever("handles route on the caller's loop (router mode)",
                                   RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="0"),
        "grpc-handles": _lever("handle calls over gRPC instead of Ray actor calls (router "
                               "mode)", RAY_SERVE_USE_GRPC_BY_DEFAULT="1"),
        "uvloop": ({**RAY_DEFAULTS, "RAY_USE_UVLOOP": "0"},
                   {**RAY_DEFAULTS, "RAY_USE_UVLOOP": "1"},
                   "uvloop as the replica's event loops (Ray's default when installed)"),
    }


LEVERS = ("throughput-optimized", "rayplane-serve-env", "user-code-on-loop", "log-buffer",
          "no-stderr-log", "router-same-loop", "grpc-handles", "uvloop")


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Fail(f"serve_levers: {what}: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lever", choices=sorted(LEVERS), help="A Ray Serve setting.")
    parser.add_argument("--before-env", action="append", default=[], metavar="K=V")
    parser.add_argument("--after-env", action="append", default=[], metavar="K=V")
    parser.add_argument("--before-ref", help="git revision whose serve code runs 'before'.")
    parser.add_argument("--after-ref", help="git revision whose serve code runs 'after' "
                                            "(default: this checkout).")
    parser.add_argument("--before-model", action="append", default=[], metavar="K=V")
    parser.add_argument("--after-model", action="append", default=[], metavar="K=V")
    parser.add_argument("--mode", choices=("direct", "router"), default="direct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="Requests at 16 clients.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pool", default="a100-mig")
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--deploy-timeout", type=float, default=300)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--niceness", type=int, default=15)
    return parser.parse_args(argv)


def _model_fields(pairs: dict[str, str]) -> dict:
    return {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
            for k, v in pairs.items()}


def variants(args, work: Path) -> tuple[Variant, Variant, str]:
    """The two apps' differences and the lever's one-line description."""
    before_env, after_env = _pairs(args.before_env, "--before-env"), _pairs(args.after_env,
                                                                           "--after-env")
    what = []
    if args.lever:
        b, a, doc = _levers()[args.lever]
        before_env, after_env = {**b, **before_env}, {**a, **after_env}
        what.append(f"{args.lever}: {doc}")
    paths = {}
    for side in ("before", "after"):
        ref = getattr(args, f"{side}_ref")
        if ref:
            paths[side] = worktree(ref, work / f"src-{side}", f"--{side}-ref")
            what.append(f"{side} = serve code of {ref}")
    if args.before_model or args.after_model:
        what.append(f"model {args.before_model} -> {args.after_model}")
    if not what:
        raise Fail("serve_levers: nothing differs: give --lever, --before-/--after-env, "
                   "-ref or -model")
    before = Variant("before", env=before_env, source_path=paths.get("before"),
                     model=_model_fields(_pairs(args.before_model, "--before-model")))
    after = Variant("after", env=after_env, source_path=paths.get("after"),
                    model=_model_fields(_pairs(args.after_model, "--after-model")))
    return before, after, "; ".join(what)


def worktree(ref: str, path: Path, flag: str) -> Path:
    """A detached checkout of ``ref`` at ``path`` (removed by :func:`drop_worktree`)."""
    run = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f",
                          str(path), ref], capture_output=True, text=True, timeout=60,
                         check=False)
    if run.returncode != 0:
        raise Fail(f"serve_levers: {flag} {ref}: {run.stderr.strip().splitlines()[-1]}")
    return path


def drop_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                   capture_output=True, timeout=60, check=False)


@dataclass
class Measure:
    """One variant in one round."""

    tokens_per_s: float
    failures: int
    ttft_ms_p50: float
    machine_ms_per_token: float | None
    serving_path_ms_per_token: float | None
    one_token_ms_p50: float
    cores: dict = field(default_factory=dict)


def measure(app: str, url: str, key: str, args) -> Measure:
    c = 16
    # The first app measured in a round ran behind the in-process engine's garbage and cold
    # connections (its clients used 0.33 cores where the second's used 0.22): warm up and
    # collect first, so the order inside a round does not pick the winner.
    asyncio.run(run_http(app, url, key, MODEL, concurrency=c, num_requests=c, max_tokens=16))
    gc.collect()
    with CpuMeter(app) as meter:
        many = asyncio.run(asyncio.wait_for(run_http(
            app, url, key, MODEL, concurrency=c, num_requests=args.requests,
            max_tokens=args.max_tokens), timeout=300))
    cpu = meter.result(many) or {}
    one = asyncio.run(asyncio.wait_for(run_http(
        app, url, key, MODEL, concurrency=1, num_requests=32, max_tokens=1, stream=False),
        timeout=120))
    return Measure(tokens_per_s=many.output_tokens_per_s,
                   failures=many.failures + one.failures, ttft_ms_p50=many.ttft_ms_p50,
                   machine_ms_per_token=cpu.get("machine_cpu_ms_per_token"),
                   serving_path_ms_per_token=cpu.get("serving_path_ms_per_token"),
                   one_token_ms_p50=one.e2e_ms_p50, cores=cpu.get("cores", {}))


def table(rounds: list[dict]) -> str:
    head = ("| round | tokens/s at 16 before / after | after / before | in-process at 16 | "
            "serving path CPU per token before / after (ms) | machine CPU per token before / "
            "after (ms) | 1 token p50 before / after (ms) |\n"
            "| --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for i, r in enumerate(rounds, 1):
        b, a = r["before"], r["after"]
        lines.append(
            f"| {i} | {b['tokens_per_s']:.0f} / {a['tokens_per_s']:.0f} | "
            f"{a['tokens_per_s'] / b['tokens_per_s']:.2f} | {r['in_process_16']:.0f} | "
            f"{b['serving_path_ms_per_token']} / {a['serving_path_ms_per_token']} | "
            f"{b['machine_ms_per_token']} / {a['machine_ms_per_token']} | "
            f"{b['one_token_ms_p50']:.1f} / {a['one_token_ms_p50']:.1f} |")
    return "\n".join(lines)


def check_units(args) -> None:
    """Take the platform's bench lock and fail (one line) unless ``--pool`` has the two units
    the two apps need (``bench-*`` apps an earlier run left count as free: they are
    replaced)."""
    cluster, target = attach(args.state_dir)
    args.lock = hold_lock(cluster.state_dir / "serve_bench.lock")
    units = read_pool_units(cluster, target, args.pool, "serve_levers", need=2)
    if units.free < 2:
        others = ", ".join(f"`rayplane serve down {a}` ({a} holds {v:g})"
                           for a, v in sorted(units.held.items()) if not a.startswith(PREFIX))
        raise Fail(f"serve_levers: pool {args.pool} has {units.free:g} free units of "
                   f"{units.total:g} and a lever needs 2 (before, after); free them: "
                   f"{others or 'see rayplane status'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="serve-levers-"))
    # SIGTERM (timeout, a CI cancel) cleans up as a normal exit does: the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rounds: list[dict] = []
    try:
        try:
            before, after, what = variants(args, work)
            check_units(args)
        except Fail as err:
            print(err, file=sys.stderr)
            return 2
        if args.niceness > os.nice(0):  # as Ray's workers (see bench/serve_bench.py)
            os.nice(args.niceness - os.nice(0))
        from bench.model import demo_size_model
        from serve.engines.cpu import CPUEngine

        print(f"lever: {what} ({args.mode} mode)", flush=True)
        folder = demo_size_model(work / "bench-model")
        engine = CPUEngine(folder, max_num_seqs=16, num_threads=1)
        apps, key = deploy_variants(args.state_dir, folder, args.mode, [before, after],
                                    pool=args.pool, timeout=args.deploy_timeout)
        for r in range(args.rounds):
            row: dict = {"in_process_16": asyncio.run(run_in_process(
                engine, num_requests=args.requests, max_tokens=args.max_tokens,
                concurrency=16)).output_tokens_per_s}
            order = [before, after] if r % 2 == 0 else [after, before]
            for v in order:
                name, url = apps[v.name]
                row[v.name] = asdict(measure(name, url, key, args))
            b, a = row["before"], row["after"]
            print(f"round {r + 1}: in-process {row['in_process_16']:.0f} tok/s; before "
                  f"{b['tokens_per_s']:.0f} tok/s, serving path {b['serving_path_ms_per_token']}"
                  f" ms/token, 1-token {b['one_token_ms_p50']:.1f} ms; after "
                  f"{a['tokens_per_s']:.0f}, {a['serving_path_ms_per_token']}, "
                  f"{a['one_token_ms_p50']:.1f} ms; cores before {json.dumps(b['cores'])}, "
                  f"after {json.dumps(a['cores'])}", flush=True)
            rounds.append(row)
    finally:
        if getattr(args, "lock", None) is not None:  # the units were ours to use
            remove_bench_apps(args.state_dir)
        for side in ("before", "after"):
            if (work / f"src-{side}").exists():
                drop_worktree(work / f"src-{side}")
        shutil.rmtree(work, ignore_errors=True)  # the model built for this run
    print(f"\n{what} ({args.mode})\n\n{table(rounds)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"lever": what, "mode": args.mode, "rounds": rounds},
                                        indent=2))
    return 0 if all(r[s]["failures"] == 0 for r in rounds for s in ("before", "after")) else 1


if __name__ == "__main__":
    sys.exit(main())
