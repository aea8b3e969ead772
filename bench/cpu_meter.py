"""Where the CPU goes during a Serve run (Linux ``/proc``): the engine thread, the model
replica's other threads, the ingress replica, HAProxy, the clients and the rest of the machine,
and the machine's CPU per output token."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.stats import Summary


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

        def per_token(seconds: float) -> float | None:
            return round(seconds * 1000 / tokens, 4) if tokens else None

        return {"cores": {k: round(v / wall, 2) for k, v in used.items()},
                "machine_cores_busy": round(machine / wall, 2),
                "machine_cpu_ms_per_token": per_token(machine),
                # Issue 16's "serving path": all the machine did for a token but the model's
                # step (the clients, HTTP, Serve, Ray, the OS).
                "engine_thread_ms_per_token": per_token(used["engine thread"]),
                "serving_path_ms_per_token": per_token(machine - used["engine thread"]),
                "cpus": os.cpu_count()}


__all__ = ["CpuMeter"]
