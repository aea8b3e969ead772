"""On a real GPU: the time-slice share rayplane derives is enforced per process.

Three processes stand for the three replicas of one GPU of a time-slice pool. Each caps itself
with ``limit_torch_gpu_memory`` and allocates most of its share: all succeed together. A
fourth, greedy one asks for more than its share and fails with an out-of-memory error alone,
while its neighbours' allocations are untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from raycluster.catalog import load_catalog
from tests.conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

WORKER = textwrap.dedent("""
    import json, sys, time
    import torch
    from raycluster.catalog import load_catalog
    from raycluster.sharing import limit_torch_gpu_memory
    pool = load_catalog().pool(sys.argv[1])
    want = float(sys.argv[2])          # fraction of this replica's share to allocate
    hold = float(sys.argv[3])
    frac = limit_torch_gpu_memory(pool)
    total = torch.cuda.get_device_properties(0).total_memory
    nbytes = int(total * frac * want)
    try:
        x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        x.fill_(1)
        torch.cuda.synchronize()
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    print(json.dumps({"fraction": frac, "bytes": nbytes, "ok": ok}), flush=True)
    time.sleep(hold)
""")


def run_replicas(pool: str, wants: list[float], hold: float = 8.0) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, pool, str(w), str(hold)],
                              stdout=subprocess.PIPE, text=True) for w in wants]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.parametrize("pool_name", ["a100-timeslice", "h100-timeslice"])
def test_time_slice_replicas_share_one_gpu(pool_name):
    pool = load_catalog().pool(pool_name)
    replicas = pool.sharing.replicas
    results = run_replicas(pool_name, [0.85] * replicas)
    assert all(r["ok"] for r in results), results
    assert all(r["fraction"] == pytest.approx(1 / replicas) for r in results)


def test_a_greedy_replica_fails_alone():
    pool = load_catalog().pool("a100-timeslice")
    results = run_replicas(pool.name, [0.8, 0.8, 1.3])
    assert results[0]["ok"] and results[1]["ok"]
    assert not results[2]["ok"], "the replica asking past its share is refused"
