"""``rayplane status`` tells the truth about the session platform: every part up and exit 0;
MLflow's process group stopped, exit 1 naming mlflow as down (its URL said to be down, not
printed as if it answered); MLflow started again, exit 0. The head-kill variant:
tests/reliability/test_head_fault.py."""

from __future__ import annotations

import json
import time

from raycluster.local import LocalCluster
from raycluster.local.processes import stop_group
from tests.integration.conftest import rayplane

#: Parts every platform of the session runs (Redis too with --ha, the ingress with its HAProxy).
ALWAYS = {"ray", "mlflow", "postgres", "prometheus"}


def status(env: dict[str, str]) -> tuple[int, dict, str]:
    """``rayplane status --json``: exit code, the JSON, and ``rayplane status``'s text."""
    out = rayplane(env, "status", "--json", timeout=60)
    assert out.stdout.strip(), out.stderr[-2000:]
    return out.returncode, json.loads(out.stdout), out.stderr


def healthy(env: dict[str, str], timeout: float = 60) -> dict:
    """The report once every part is up (an application an earlier test deployed may still be
    settling); fails with the last report when that does not come within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        code, info, _ = status(env)
        if code == 0 or time.monotonic() > deadline:
            assert code == 0, json.dumps(info["health"], indent=2)
            return info
        time.sleep(3)


def test_status_is_up_names_a_stopped_mlflow_and_is_up_again(local_cluster: LocalCluster,
                                                              cluster_env: dict[str, str]):
    start = time.monotonic()
    info = healthy(cluster_env)
    health = info["health"]
    parts = health["parts"]
    assert health["status"] == "up"
    assert ALWAYS | ({"redis"} if info.get("ha") else set()) <= set(parts), parts
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(parts, "up")
    assert health["seconds"] < 5
    assert len(parts["ray"]["details"]["nodes"]) == len(local_cluster.node_plan())
    assert sorted(n["pool"] for n in info["nodes"]) == sorted(
        n.pool for n in local_cluster.node_plan())
    print(f"\n[status] {health['reason']} in {health['seconds']} s (probes: "
          + ", ".join(f"{k} {v}" for k, v in health["probe_seconds"].items()) + ")")

    mlflow = next(p for p in local_cluster.state().processes if p.name == "mlflow")
    try:
        stop_group(mlflow, timeout=30)
        text = rayplane(cluster_env, "status", timeout=60)
        assert text.returncode == 1, text.stdout + text.stderr
        assert "mlflow down" in text.stderr, text.stderr
        assert f"MLflow UI       down: no answer at {local_cluster.mlflow_uri}/health" in text.stdout
        assert f"MLflow UI       {local_cluster.mlflow_uri}\n" not in text.stdout
        code, info, _ = status(cluster_env)
        assert code == 1
        down = info["health"]["parts"]["mlflow"]
        assert down["status"] == "down", down
        assert down["reason"].endswith(f"its process (pid {mlflow.pid}) has exited"), down
        assert info["health"]["status"] == "down"
        assert info["health"]["reason"] == "mlflow down", info["health"]
    finally:
        local_cluster.restart_service("mlflow")

    info = healthy(cluster_env, timeout=30)
    assert info["health"]["parts"]["mlflow"]["status"] == "up"
    print(f"[status] up -> mlflow stopped: exit 1, 'mlflow down' -> restarted: exit 0, in "
          f"{time.monotonic() - start:.1f} s")
