"""A worker node's object store filled past its size: the job spills to disk (or fails with a
clear out-of-memory error), nothing it put is lost, and the cluster stays up: every node and
process alive, a later job on the same pool runs."""

from __future__ import annotations

import json
import re
import time

from tests.support.platform import ray_job_submit

POOL = "a100-mig"       # its local node has a 512 MiB object store (LocalCluster.node_plan)
OBJECTS, MB = 5, 128    # 640 MiB held at once: more than the store holds
SCRIPT = "tests/reliability/fill_object_store.py"


def fill_result(text: str) -> dict:
    found = re.search(r"^FILL_RESULT (.*)$", text, re.MULTILINE)
    assert found, text[-3000:]
    return json.loads(found[1])


def test_a_full_object_store_spills_and_the_cluster_stays_up(local_cluster, cluster_env,
                                                             record_property):
    store_mb = next(n.object_store_mb for n in local_cluster.node_plan() if n.pool == POOL)
    assert store_mb < OBJECTS * MB
    nodes_before = {n["node_id"] for n in local_cluster.alive_nodes()}
    started = time.monotonic()
    proc = ray_job_submit(cluster_env, "python", SCRIPT, POOL, str(OBJECTS), str(MB),
                          timeout=300)
    out = proc.stdout + proc.stderr
    result = fill_result(out)
    if result["error"]:
        # The other way a full store may end: a clear out-of-memory error, not a crash.
        assert re.search(r"ObjectStoreFullError|OutOfMemoryError|OutOfDiskError",
                         result["error"]), result["error"]
    else:
        assert proc.returncode == 0, out[-3000:]
        assert result["put_bytes"] == OBJECTS * MB * 1024 * 1024
        assert result["intact_bytes"] == result["put_bytes"], "objects came back wrong"
        assert result["spilled_objects"] >= 1 and result["spilled_mib"] >= MB, result
    fill_s = time.monotonic() - started

    # The cluster stays up: the same nodes, every process, and a later job on the pool.
    assert local_cluster.is_up(), local_cluster.status()["processes"]
    assert {n["node_id"] for n in local_cluster.alive_nodes()} == nodes_before
    later = ray_job_submit(cluster_env, "python", "-c", (
        "import ray; ray.init(); "
        f"t = ray.remote(lambda: 6 * 7).options(num_cpus=0, resources={{'pool:{POOL}': 1}}); "
        "print('LATER', ray.get(t.remote(), timeout=120))"), timeout=300)
    assert later.returncode == 0 and "LATER 42" in later.stdout, later.stdout + later.stderr

    lost = (result["put_bytes"] - result["intact_bytes"]) // (1024 * 1024)
    summary = (f"object store full: {OBJECTS} x {MB} MiB put on a {store_mb} MiB store, "
               f"{result['spilled_objects']} objects ({result['spilled_mib']} MiB) spilled, "
               f"error {result['error'] or 'none'}, {lost} MiB lost, fill+read "
               f"{result.get('seconds')}s, job {fill_s:.0f}s; nodes alive "
               f"{len(nodes_before)}/{len(nodes_before)}, the next job ran")
    print(summary)
    for key in ("put_bytes", "intact_bytes", "spilled_mib", "spilled_objects", "error"):
        record_property(key, result[key])
    record_property("summary", summary)
