"""The session's feature store on the session platform: ``rayplane features apply`` then
``rayplane features materialize``, once per session, as a user runs them (Ray jobs on the cpu
pool). Registered by tests/conftest.py's ``pytest_plugins``; H2's training fixture and the
agents' tool test build on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.platform import rayplane

__all__ = ["feature_store_ready", "features_result"]


def features_result(output: str) -> dict:
    """The ``RAYPLANE_FEATURES {json}`` line a features job prints last."""
    line = next((l for l in reversed(output.splitlines()) if "RAYPLANE_FEATURES " in l), None)
    assert line is not None, f"no RAYPLANE_FEATURES line in:\n{output[-3000:]}"
    return json.loads(line.split("RAYPLANE_FEATURES ", 1)[1])


@pytest.fixture(scope="session")
def feature_store_ready(local_cluster, cluster_env) -> dict:
    """Apply and materialise the feature repository on the session platform. Returns the
    state folder, the feature_store.yaml and data paths, each command's output, parsed
    result and duration (seconds)."""
    info: dict = {"state_dir": Path(local_cluster.state_dir)}
    for command in ("apply", "materialize"):
        started = time.monotonic()
        out = rayplane(cluster_env, "features", command, timeout=900)
        seconds = round(time.monotonic() - started, 1)
        print(f"rayplane features {command}: {seconds}s")
        assert out.returncode == 0, f"rayplane features {command}:\n{out.stdout}\n{out.stderr}"
        info[command] = {"stdout": out.stdout, "seconds": seconds,
                         "result": features_result(out.stdout)}
    root = info["state_dir"] / "features"
    info.update(root=root, config=root / "feature_store.yaml", data=root / "data",
                registry=root / "registry.db")
    return info
