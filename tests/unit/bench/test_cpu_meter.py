"""The serving benchmark's CPU meter: the cores it attributes are CPU time that was spent,
put where it was spent (the clients' share is this process's own CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.cpu_meter import CpuMeter
from bench.stats import Summary


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux's /proc")
def test_meter_puts_this_process_cpu_under_clients():
    def cpu_s() -> float:
        t = os.times()
        return t.user + t.system

    with CpuMeter("no-such-app") as meter:
        start = cpu_s()
        while cpu_s() - start < 0.3:  # 0.3 s of CPU, however long the machine takes
            sum(range(10_000))
        spent = cpu_s() - start
    run = Summary(system="t", concurrency=1, stream=True, requests=1, failures=0,
                  duration_s=1.0, request_throughput=1.0, output_tokens_per_s=100.0,
                  ttft_ms_p50=0, ttft_ms_p99=0, itl_ms_p50=0, itl_ms_p99=0,
                  tpot_ms_p50=0, e2e_ms_p50=0, e2e_ms_p99=0, errors=[])
    result = meter.result(run)
    cores = result["cores"]
    wall = spent / cores["clients (openai, this process)"]
    assert wall > 0
    # No replica of that app exists: nothing is put under the engine or the replicas.
    assert cores["engine thread"] == cores["model replica, other threads"] == 0
    assert cores["ingress replica"] == 0
    # The machine was at least as busy as this process, and the parts never add up to more
    # than the machine: in CPU seconds, up to the rounding of /proc's clock ticks (each of
    # the two readings of both counters is up to a tick short; results rounded to 0.01).
    slack = 4 / os.sysconf("SC_CLK_TCK") + 0.01 * wall
    assert result["machine_cores_busy"] * wall >= spent - slack
    assert (sum(cores.values()) - result["machine_cores_busy"]) * wall <= slack
    assert result["machine_cpu_ms_per_token"] == pytest.approx(
        result["machine_cores_busy"] * wall * 1000 / 100, rel=0.1)
    # Issue 16's serving path is all the machine did but the engine thread: here, all of it.
    assert result["engine_thread_ms_per_token"] == 0
    assert result["serving_path_ms_per_token"] == result["machine_cpu_ms_per_token"]
