"""The processes of the local platform: the record of a process group rayplane started, how
such groups and their sessions are found (``/proc``) and stopped, and the port checks a start
begins with.

Every process is started in its own session, so its pid is its process group id and its
session id. Stopping signals exactly those groups, then what is left in those sessions -- never
processes found by name, so nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ManagedProcess:
    """One process group rayplane started (its leader's pid is the group id)."""

    name: str
    pid: int
    argv: list[str]
    log: str
    #: A signal that stops the leader on its own (e.g. "SIGINT", PostgreSQL's fast shutdown:
    #: its children lead sessions of their own and are stopped by the leader); empty:
    #: SIGTERM to the whole group.
    stop_signal: str = ""
    #: Environment it was started with beyond the platform's own (never a secret): a restart
    #: (raycluster/local/nodes.py) starts it again exactly so.
    env: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        # Guard against pid reuse: the process must still be the command we started.
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if is_zombie(self.pid):
            return False
        if not any(cmdline):  # just forked, not yet exec'd: it is ours
            return True
        first = Path(self.argv[0]).name.encode()
        return any(first in part for part in cmdline[:3])


# -- /proc -------------------------------------------------------------------------------


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def live_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, process group, session) of every live (non-zombie) process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry.name), int(fields[2]), int(fields[3])


def session_members(sids: set[int]) -> list[int]:
    """Live processes whose session id is one of ``sids``."""
    return [pid for pid, _, sid in live_processes() if sid in sids]


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the live children of ``pid``; the start time tells a child from
    a later process that reused its pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] != "Z" and fields[1] == str(pid):
                found.append((int(entry.name), fields[19]))
    return found


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ... (empty when
    the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg(0); the group is alive if any member is not a zombie.
    return any(group == pgid for _, group, _ in live_processes())


# -- stopping ----------------------------------------------------------------------------


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: ManagedProcess, timeout: float) -> bool:
    """SIGTERM the process group rayplane started (or its ``stop_signal`` to the leader
    alone), then SIGKILL what is left after ``timeout``. Only a group whose leader is still the recorded command is signalled; a
    group whose leader died (its children may live on) gets SIGKILL."""
    if not proc.alive():
        if group_alive(proc.pid):
            kill_group(proc.pid)
            return True
        return False
    kids = children(proc.pid) if proc.stop_signal else []
    try:
        if proc.stop_signal:
            os.kill(proc.pid, signal.Signals[proc.stop_signal])
        else:
            os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(proc.pid):
        time.sleep(0.3)
    kill_group(proc.pid)
    _stop_children(kids, timeout=5.0)
    return True


def _stop_children(kids: list[tuple[int, str]], timeout: float) -> None:
    """Children in sessions of their own leave when their leader is gone; SIGKILL those
    still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = kids
    while left:
        left = [(pid, start) for pid, start in left
                if (fields := _stat_fields(pid)) and fields[0] != "Z" and fields[19] == start]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_sessions(sids: set[int], timeout: float) -> None:
    """SIGTERM what is left in these sessions, SIGKILL it after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = session_members(sids)
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 0)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = session_members(sids)
        if not left:
            return


# -- ports and logs ----------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers bind with SO_REUSEADDR, so connections in TIME_WAIT don't make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. The sockets stay bound until all are picked: one
    closed before the next bind can be handed out again (a node once got the same port for
    two of its agents and failed to start)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def log_tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a process's log, on one line."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


__all__ = [
    "ManagedProcess",
    "children",
    "free_port",
    "free_ports",
    "group_alive",
    "is_zombie",
    "kill_group",
    "live_processes",
    "log_tail",
    "port_is_free",
    "session_members",
    "stop_group",
    "stop_sessions",
]
