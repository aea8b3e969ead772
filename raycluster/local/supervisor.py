"""The node supervisor of an ``--ha`` platform: what the kubelet is to KubeRay's pods. It
watches every Ray node ``rayplane up`` started and starts a dead one again with the same
command line (``nodes.restart_node``); a dead head comes back with its GCS state from Redis,
so the cluster, its detached actors, Serve applications and jobs live on.

Run as ``python -m raycluster.local.supervisor STATE_DIR`` in a session of its own, recorded in
``state.json`` after the nodes so that ``rayplane down`` (reverse order) stops it first. It
logs each restart to ``logs/supervisor.log`` and exits when the state file is gone.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from raycluster.errors import PlatformError
from raycluster.local.nodes import restart_node
from raycluster.local.state import LocalState, NodePlan

#: Seconds between two looks at the nodes.
POLL_S = 1.0


def log(msg: str) -> None:
    print(f"{datetime.now(UTC).isoformat(timespec='seconds')} {msg}", flush=True)


def dead_pools(st: LocalState) -> list[str]:
    """Pools whose Ray node's process has exited, the head's first (the workers need it)."""
    by_name = {p.name: p for p in st.processes}
    dead = []
    for n in st.nodes:
        node = NodePlan(**n)
        proc = by_name.get(f"ray-{node.role}-{node.pool}")
        if proc is not None and not proc.alive():
            dead.append((node.role != "head", node.pool))
    return [pool for _, pool in sorted(dead)]


def supervise(state_dir: Path) -> None:
    from raycluster.local.cluster import LocalCluster

    log(f"supervising the Ray nodes of {state_dir}")
    while True:
        st = LocalState.load(state_dir)
        if st is None:
            log("the platform is down; exiting")
            return
        for pool in dead_pools(st):
            started = time.monotonic()
            log(f"the Ray node of pool {pool} is dead; starting it again")
            try:
                restart_node(LocalCluster.attach(state_dir), pool)
                log(f"the Ray node of pool {pool} is back after "
                    f"{time.monotonic() - started:.1f}s")
            except PlatformError as err:
                log(f"restarting the Ray node of pool {pool} failed: {err}")
        time.sleep(POLL_S)


if __name__ == "__main__":
    supervise(Path(sys.argv[1]))
