"""The serving benchmark's guard: the free-unit check and its one line, read from Serve's
details as the dashboard returns them (no cluster), and the cleanup a real SIGTERM runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.guard import (
    Fail,
    TimeUp,
    bounded,
    free_units,
    held_units,
    hold_lock,
    stuck_line,
    units_line,
)
from bench.load import run_budget_s

REPO = Path(__file__).resolve().parents[3]
GPU = "pool:a100-mig"


def replica(state: str = "RUNNING", node: str | None = "n1") -> dict:
    return {"replica_id": "r", "state": state, "node_id": node, "start_time_s": 0.0}


def deployment(resources: dict, *replicas: dict, status: str = "HEALTHY",
               message: str = "") -> dict:
    return {"status": status, "message": message, "required_resources": resources,
            "replicas": list(replicas)}


def details(**apps: dict) -> dict:
    return {"applications": {name.replace("_", "-"): app for name, app in apps.items()}}


def app(status: str = "RUNNING", **deployments: dict) -> dict:
    return {"status": status, "message": "", "deployments": deployments}


# The demo's openai app (router: the ingress on the cpu pool, the model on a100-mig), and a
# bench app a killed run left.
DEMO = details(
    openai=app(OpenAIIngress=deployment({"CPU": 1, "pool:cpu": 1}, replica()),
               chat=deployment({GPU: 1}, replica())),
    bench_direct=app(chat=deployment({GPU: 1}, replica())))


def test_held_units_counts_placed_replicas_of_the_pool():
    assert held_units(DEMO, GPU) == {"openai": 1.0, "bench-direct": 1.0}
    assert held_units(DEMO, "pool:cpu") == {"openai": 1.0}
    # A replica waiting to be scheduled holds nothing; a stopped one gave its unit back.
    waiting = details(openai=app("DEPLOYING", chat=deployment(
        {GPU: 1}, replica("STARTING", None), replica("STOPPED"))))
    assert held_units(waiting, GPU) == {}
    # Without required_resources: the deployment's ray_actor_options.
    old = details(openai=app(chat={"deployment_config": {"ray_actor_options": {
        "resources": {GPU: 2}}}, "replicas": [replica(), replica()]}))
    assert held_units(old, GPU) == {"openai": 4.0}


def test_free_units_counts_leftover_bench_apps_as_free():
    held = held_units(DEMO, GPU)
    assert free_units(2, 2, held) == 1  # bench-direct's unit: the bench removes it first
    assert free_units(2, 0, held) == 1  # Ray's report lags: Serve's own count is higher
    assert free_units(2, 2, {"openai": 2}) == 0
    assert free_units(2, 1, {}) == 1  # a unit held outside Serve


def test_units_line_names_the_app_to_remove_and_the_ingress_that_fits():
    held = held_units(DEMO, GPU)
    line = units_line("a100-mig", ["router", "direct"], 2, free_units(2, 2, held), held)
    assert line == ("serve_bench: pool a100-mig has 1 free unit of 2 and the bench needs 2 "
                    "(router, direct); free one: `rayplane serve down openai` (app openai "
                    "holds 1), or run with --ingress router")
    assert units_line("a100-mig", ["router"], 2, 1, held) is None


def test_units_line_when_the_pool_can_never_hold_all_apps():
    modes = ["router", "direct", "triton"]
    assert units_line("a100-mig", modes, 2, 2, {}) == (
        "serve_bench: pool a100-mig has 2 free units of 2 and the bench needs 3 (router, "
        "direct, triton); run with --ingress router,direct")
    line = units_line("a100-mig", modes, 2, 0, {"openai": 1, "demo": 1},
                      state_dir=Path("/tmp/s"))
    assert line == (
        "serve_bench: pool a100-mig has 0 free units of 2 and the bench needs 3 (router, "
        "direct, triton); free 2: `rayplane serve down demo --state-dir /tmp/s`, `rayplane "
        "serve down openai --state-dir /tmp/s` (app demo holds 1, app openai holds 1) and run "
        "with --ingress router,direct")
    assert "\n" not in line


def test_units_line_held_outside_serve_and_mixed_vllm_apps():
    line = units_line("a100-mig", ["router"], 2, 0, {"chat-vllm": 1, "chat": 0.5})
    assert "`rayplane serve down chat`" in line and "chat-vllm" in line
    outside = units_line("a100-mig", ["router"], 1, 0, {})
    assert "held outside Serve" in outside and outside.startswith("serve_bench: pool a100-mig")
    assert "no units" in units_line("nope", ["router"], 0, 0, {})


def test_stuck_line_says_what_the_replica_waits_for():
    waiting = details(bench_direct=app("DEPLOYING", chat=deployment(
        {GPU: 1}, replica("STARTING", None), status="UPDATING",
        message="Deployment 'chat' in application 'bench-direct' has 1 replicas that have "
                "taken more than 30s to be scheduled.\nResources required for each replica: "
                "{\"pool:a100-mig\": 1.0}, total resources available: {}.")))
    line = stuck_line(waiting, "bench-direct", 300)
    assert line.startswith("serve_bench: bench-direct is not RUNNING after 300s (DEPLOYING): "
                           "chat UPDATING (1 STARTING unplaced): Resources required")
    assert "\n" not in line
    assert "did not appear" in stuck_line(details(), "bench-router", 5)


def test_bounded_cuts_a_wait_short():
    start = time.monotonic()
    with pytest.raises(TimeUp, match="the wait took more than"), bounded(0.2, "the wait"):
        time.sleep(5)
    assert time.monotonic() - start < 2
    with bounded(0.1, "nothing"):  # the alarm is off again afterwards
        pass
    time.sleep(0.3)


def test_a_second_bench_on_the_platform_is_refused(tmp_path):
    first = hold_lock(tmp_path / "serve_bench.lock")
    with pytest.raises(Fail, match=r"another bench is running on this platform \(pid \d+"):
        hold_lock(tmp_path / "serve_bench.lock")
    first.close()  # released: the next bench goes on
    hold_lock(tmp_path / "serve_bench.lock").close()


def test_run_budget_grows_with_the_work():
    assert 60 < run_budget_s(1, 1) < run_budget_s(64, 64) < run_budget_s(128, 64)


# The bench's handler in a process of its own, signalled for real: the cleanup runs once, to
# its end, and a second signal during it does not cut it short.
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bench.guard import Cleanup

    out = Path(sys.argv[1])
    cleanup = Cleanup()
    cleanup.install()

    def slow_step():
        print("step started", flush=True)
        time.sleep(0.6)  # the second signal lands here
        out.write_text(out.read_text() + "apps removed\\n")

    try:
        out.write_text("")
        cleanup.add("removing the bench-* Serve apps", slow_step)
        cleanup.add("stopping the FastAPI baseline",
                    lambda: out.write_text(out.read_text() + "server stopped\\n"))
        print("ready", flush=True)
        time.sleep(30)
        out.write_text(out.read_text() + "slept on\\n")
    finally:
        cleanup.run()
""")


def test_sigterm_runs_the_cleanup_of_a_normal_exit(tmp_path):
    out = tmp_path / "steps"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "step started"
        proc.send_signal(signal.SIGINT)  # during cleanup
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    # Last added first: the server, then the apps, each once.
    assert out.read_text() == "server stopped\napps removed\n"
    lines = stderr.splitlines()
    assert lines[0] == ("serve_bench: SIGTERM: cleaning up (stopping the FastAPI baseline, "
                        "removing the bench-* Serve apps)")
    assert lines[1].startswith("serve_bench: still cleaning up")
    assert len(lines) == 2, stderr
