"""What the tests read of local processes from /proc: the sockets one listens on, the
processes whose command line holds a marker."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].split(":")
                raw = bytes.fromhex(addr)
                # /proc prints each 32-bit word of the address in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return out


def pids_with(*markers: str, exe: str | None = None) -> list[int]:
    """Processes whose command line holds every one of ``markers`` (and whose executable is
    named ``exe``: a shell that runs a program has the program's arguments too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if exe is not None and (entry / "exe").resolve().name != exe:
                continue
        except OSError:
            continue
        if all(m in cmdline for m in markers):
            found.append(int(entry.name))
    return found


__all__ = ["listening", "pids_with"]
