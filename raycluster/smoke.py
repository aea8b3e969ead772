"""Smoke job: ``python -m raycluster.smoke --pool NAME``, submitted with
``ray job submit --entrypoint-resources '{"pool:NAME": 1}'``.

It proves the placement contract of a pool: the job's driver runs on a node of that pool, and
a task that asks for the pool's resource runs there too. It prints one JSON line and exits 1
if either landed elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import ray

from raycluster.catalog import POOL_RESOURCE_PREFIX


def _node_pool(node_id: str) -> str | None:
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            pools = [r[len(POOL_RESOURCE_PREFIX):] for r in node["Resources"]
                     if r.startswith(POOL_RESOURCE_PREFIX)]
            return pools[0] if pools else None
    return None


@ray.remote(num_cpus=0)
def _where() -> str:
    return ray.get_runtime_context().get_node_id()


def _supervisor_node() -> str | None:
    """Node of the job's supervisor: the Ray worker among this driver's ancestors. The
    entrypoint resources reserve a slot there; the driver itself attaches to the head's
    raylet, as every driver on a host with several Ray nodes does."""
    from ray.util.state import list_workers

    pid, ancestors = os.getppid(), []
    for _ in range(4):
        ancestors.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    for worker in list_workers(filters=[("worker_type", "=", "WORKER")], limit=10_000):
        if worker.pid in ancestors:
            return worker.node_id
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool", required=True, help="Pool the job was submitted to.")
    args = parser.parse_args(argv)
    ray.init(log_to_driver=False)
    supervisor_node = _supervisor_node()
    task_node = ray.get(_where.options(
        resources={f"{POOL_RESOURCE_PREFIX}{args.pool}": 0.01}).remote())
    result = {"pool": args.pool, "entrypoint_pool": _node_pool(supervisor_node) if supervisor_node else None,
              "task_pool": _node_pool(task_node), "host": socket.gethostname()}
    ok = result["entrypoint_pool"] == args.pool and result["task_pool"] == args.pool
    result["ok"] = ok
    print("RAYPLANE_SMOKE " + json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
