"""A job that fills one pool node's object store: ``python tests/reliability/fill_object_store.py
POOL OBJECTS MB`` (submitted with ``ray job submit``, as a user would). A task on the pool's node
``ray.put``s OBJECTS objects of MB MiB each and keeps every reference, more than the node's
store holds, then reads each one back and checks its bytes; it prints one line,
``FILL_RESULT {json}``: bytes put, bytes that came back intact, the seconds it took, the
objects and MiB Ray spilled, or the error a failed put raised (its type and first line).
"""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import ray

MIB = 1024 * 1024


def fill(objects: int, mb: int) -> dict:
    started = time.monotonic()
    refs, put, error = [], 0, None
    try:
        for i in range(objects):
            refs.append(ray.put(np.full(mb * MIB, i % 251, dtype=np.uint8)))
            put += mb * MIB
    except Exception as err:  # noqa: BLE001 - what a user would see is the result
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    intact = 0
    for i, ref in enumerate(refs):  # spilled objects are restored from disk here
        arr = ray.get(ref)
        if arr.size == mb * MIB and int(arr[0]) == int(arr[-1]) == i % 251:
            intact += arr.size
        del arr
    return {"node": ray.get_runtime_context().get_node_id(), "put_bytes": put,
            "intact_bytes": intact, "seconds": round(time.monotonic() - started, 1),
            "error": error}


def spilled() -> tuple[int, int]:
    """(MiB, objects) spilled in the cluster so far, from what `ray memory --stats-only`
    prints."""
    from ray._private.internal_api import memory_summary

    found = re.search(r"Spilled (\d+) MiB, (\d+) objects", memory_summary(stats_only=True))
    return (int(found[1]), int(found[2])) if found else (0, 0)


def main(pool: str, objects: int, mb: int) -> None:
    ray.init()
    before = spilled()
    task = ray.remote(fill).options(num_cpus=0, resources={f"pool:{pool}": 1})
    try:
        result = ray.get(task.remote(objects, mb), timeout=300)
    except Exception as err:  # noqa: BLE001 - the task itself failed: report it
        result = {"put_bytes": 0, "intact_bytes": 0,
                  "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"}
    after = spilled()
    result.update(spilled_mib=after[0] - before[0], spilled_objects=after[1] - before[1])
    print("FILL_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
