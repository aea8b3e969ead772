"""What keeps the serving benchmark safe to run on a shared platform: it checks that the pool
has a free unit for each of its apps before deploying anything (else one line naming the apps
that hold them), bounds each wait (:func:`bounded`), and undoes what it started -- its
``bench-*`` Serve apps, the FastAPI server -- the same way on a normal exit, a failure and
SIGTERM/SIGINT (:class:`Cleanup`).

The checks are pure functions of Serve's details (``get_serve_details()``) and the pool's
units, so they are tested without a cluster; :func:`pool_units` reads the latter."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The bench's Serve apps are all named so (bench/serve_deploy.py); others are never touched.
PREFIX = "bench-"
#: Replica states that may hold their resources (STOPPED ones gave them back).
HOLDING = {"STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING", "PENDING_MIGRATION"}


class Fail(Exception):
    """The bench cannot go on; the message is the one line the user sees."""


class TimeUp(Exception):
    """A wait :func:`bounded` limits ran out."""


def fmt(x: float) -> str:
    return f"{x:g}"


def held_units(details: dict, resource: str) -> dict[str, float]:
    """Units of ``resource`` each Serve application's placed replicas hold: per deployment,
    what one replica asks for (``required_resources``, else its ``ray_actor_options``) times
    its replicas that run on a node. A replica still waiting to be scheduled holds nothing."""
    held: dict[str, float] = {}
    for app, app_d in (details.get("applications") or {}).items():
        for dep in (app_d.get("deployments") or {}).values():
            per = (dep.get("required_resources") or {}).get(resource)
            if per is None:
                options = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
                per = (options.get("resources") or {}).get(resource, 0)
            placed = [r for r in dep.get("replicas") or []
                      if r.get("state") in HOLDING and r.get("node_id")]
            if per and placed:
                held[app] = held.get(app, 0.0) + float(per) * len(placed)
    return held


def free_units(total: float, used: float, held: dict[str, float]) -> float:
    """Units the bench can have: those Ray reports free (``used`` of ``total``; Serve's own
    count when that is higher, Ray's report lags by a few seconds) plus those of leftover
    ``bench-*`` apps, which the bench removes before deploying."""
    used = max(used, sum(held.values()))
    mine = sum(v for app, v in held.items() if app.startswith(PREFIX))
    return max(0.0, min(total, total - used + mine))


def units_line(pool: str, modes: Sequence[str], total: float, free: float,
               held: dict[str, float], state_dir: Path | None = None) -> str | None:
    """None when ``pool`` has a free unit for each bench app (one per ingress mode: its model
    replica), else the one line saying what to do: which apps to remove (``rayplane serve
    down``, largest holders first) or which ``--ingress`` fits."""
    need = len(modes)
    if need <= free:
        return None
    if total <= 0:
        return (f"serve_bench: pool {pool} has no units on this cluster; "
                f"`rayplane status` lists its pools (--pool)")
    units = "unit" if free == 1 else "units"
    head = (f"serve_bench: pool {pool} has {fmt(free)} free {units} of {fmt(total)} and the "
            f"bench needs {need} ({', '.join(modes)})")
    target = min(need, int(total))  # the most apps the pool could ever hold
    short = target - int(free)
    where = f" --state-dir {state_dir}" if state_dir else ""
    fixes = []
    if short > 0:
        others = sorted(((v, a) for a, v in held.items() if not a.startswith(PREFIX) and v > 0),
                        key=lambda t: (-t[0], t[1]))
        chosen, got = [], 0.0
        for v, app in others:
            if got >= short:
                break
            chosen.append((app, v))
            got += v
        word = "one" if short == 1 else str(short)
        if got >= short:
            # A mixed config's vllm models run in `<name>-vllm`: `serve down <name>` removes both.
            names = [a[:-5] if a.endswith("-vllm") and a[:-5] in held else a for a, _ in chosen]
            fix = (f"free {word}: " + ", ".join(f"`rayplane serve down {n}{where}`"
                                                 for n in dict.fromkeys(names))
                   + " (" + ", ".join(f"app {a} holds {fmt(v)}" for a, v in chosen) + ")")
        else:
            fix = (f"free {word}: {fmt(short - got)} held outside Serve (a Ray job? see the "
                   f"dashboard's Actors)"
                   + "".join(f", `rayplane serve down {a}{where}` (app {a} holds {fmt(v)})"
                             for a, v in chosen))
        if target < need:
            fix += f" and run with --ingress {','.join(modes[:target])}"
        fixes.append(fix)
    if 1 <= int(free) < need:
        fixes.append(f"run with --ingress {','.join(modes[:int(free)])}")
    return head + "; " + ", or ".join(fixes)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]  # a traceback ends with what went wrong


def stuck_line(details: dict, app: str, seconds: float) -> str:
    """One line on an app that is not RUNNING after ``seconds``: its status, each deployment's
    status and replica states (placed on a node or not) and Serve's message, which names the
    resources a replica waits for."""
    app_d = (details.get("applications") or {}).get(app)
    if app_d is None:
        return f"serve_bench: {app} did not appear in Serve within {seconds:.0f}s"
    parts = []
    message = _first_line(app_d.get("message") or "")
    for name, dep in (app_d.get("deployments") or {}).items():
        states: dict[str, int] = {}
        for r in dep.get("replicas") or []:
            key = r.get("state", "?") + ("" if r.get("node_id") else " unplaced")
            states[key] = states.get(key, 0) + 1
        replicas = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no replicas"
        parts.append(f"{name} {dep.get('status', '?')} ({replicas})")
        if dep.get("status") != "HEALTHY" and dep.get("message"):
            message = _first_line(dep["message"])
    return (f"serve_bench: {app} is not RUNNING after {seconds:.0f}s "
            f"({app_d.get('status', '?')}): {'; '.join(parts) or 'no deployments'}"
            + (f": {message}" if message else ""))


def pool_units(cluster, resource: str) -> tuple[float, float]:
    """(used, total) units of ``resource`` on the local platform ``cluster``: the total its
    alive nodes advertise, the use Ray's autoscaler reports (the dashboard's cluster status;
    0 when it has none yet, and then Serve's details alone count)."""
    total = sum(float((n.get("resources_total") or {}).get(resource, 0))
                for n in cluster.alive_nodes())
    try:
        usage = cluster.get_json("/api/cluster_status", timeout=10)
        used = float(usage["data"]["clusterStatus"]["loadMetricsReport"]["usage"][resource][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        used = 0.0
    return used, total


@dataclass
class PoolUnits:
    """A pool's units as a bench finds them: Serve's details, what each app holds, the
    pool's total and what a bench may have (:func:`free_units`)."""

    pool: Any  # raycluster.catalog.Pool
    details: dict
    held: dict[str, float]
    total: float
    free: float


def read_pool_units(cluster, target, pool_name: str, prog: str, need: float = 0,
                    wait_s: float = 60) -> PoolUnits:
    """The units of pool ``pool_name`` on the local platform, or Fail (one line, ``prog``:
    an unknown pool, an unreachable dashboard). While fewer than ``need`` are free it reads
    again for up to ``wait_s`` seconds: Ray reports the units of an app just removed (the
    previous bench's) as used for a few seconds more."""
    from serve.deploy import client, first_line

    try:
        pool = cluster.catalog.pool(pool_name, field="--pool")
    except Exception as err:  # noqa: BLE001 - SpecError, already one line naming the pools
        raise Fail(f"{prog}: {err}") from None
    if not pool.has_gpu:  # a CPU pool counts cores, which a bench app does not take whole
        need = 0
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with bounded(30, "reading the cluster's Serve apps and units"):
                details = client(target).get_serve_details()
                used, total = pool_units(cluster, pool.ray_resource)
        except Exception as err:  # noqa: BLE001 - TimeUp, PlatformError, the dashboard's
            raise Fail(f"{prog}: {first_line(str(err))}") from None
        held = held_units(details, pool.ray_resource)
        free = free_units(total, used, held)
        # Waiting helps only units that exist: a pool too small for ``need`` is said at once.
        if free >= need or need > total or time.monotonic() > deadline:
            return PoolUnits(pool, details, held, total, free)
        time.sleep(2)


def hold_lock(path: Path):
    """Take the platform's bench lock (``flock`` on ``path``, released when this process ends,
    even by SIGKILL) or Fail naming the bench that holds it: the ``bench-*`` apps of a bench
    that is still running are not leftovers to remove. Returns the open file (keep it)."""
    import fcntl
    import os

    lock = open(path, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise Fail(f"serve_bench: another bench is running on this platform (pid "
                   f"{lock.read().strip() or '?'}, lock {path}); wait for it or stop it") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


@contextmanager
def bounded(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`TimeUp` in the main thread when the block runs past ``seconds`` (SIGALRM:
    it also cuts short an HTTP call that has no timeout of its own). Not nestable."""
    def on_alarm(signum, frame):
        raise TimeUp(f"{what} took more than {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Cleanup:
    """What the bench undoes on its way out, run once (:meth:`run`, from the bench's
    ``finally``) whether it ends normally, fails or is signalled: :meth:`install` makes
    SIGTERM and SIGINT raise SystemExit (128 + signal) so that ``finally`` runs. From then on
    a further signal only says that cleanup is under way: each step is bounded, and one
    abandoned halfway would leave what the next run trips on."""

    def __init__(self, name: str = "serve_bench"):
        self.name = name
        self.steps: list[tuple[str, Callable[[], object], float]] = []
        self.ran = False

    def add(self, what: str, step: Callable[[], object], timeout: float = 60) -> None:
        self.steps.append((what, step, timeout))

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._hold()
        print(f"{self.name}: {signal.Signals(signum).name}: cleaning up "
              f"({', '.join(what for what, _, _ in reversed(self.steps)) or 'nothing started'})",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def _hold(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._again)

    def _again(self, signum, frame) -> None:
        print(f"{self.name}: still cleaning up (each step bounded; SIGKILL abandons it)",
              file=sys.stderr, flush=True)

    def run(self) -> None:
        """Each step, last added first, each within its timeout; one that fails is reported
        in a line and the others still run."""
        if self.ran:
            return
        self.ran = True
        self._hold()
        while self.steps:
            what, step, timeout = self.steps.pop()
            try:
                with bounded(timeout, what):
                    step()
            except Exception as err:  # noqa: BLE001 - one step failing must not skip the rest
                print(f"{self.name}: cleanup: {what} failed: {_first_line(str(err))}",
                      file=sys.stderr, flush=True)


__all__ = ["PREFIX", "Cleanup", "Fail", "PoolUnits", "TimeUp", "bounded", "free_units",
           "held_units", "hold_lock", "pool_units", "read_pool_units", "stuck_line",
           "units_line"]
