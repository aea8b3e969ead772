"""The session's one real local platform, shared by tests/integration and tests/reliability
(registered by tests/conftest.py's ``pytest_plugins``): a multi-node Ray cluster (`ray start`
processes, one node per pool, token auth on), MLflow, PostgreSQL and Prometheus, on free
loopback ports, in a temporary state folder; stopped (by pid) when the session ends. Plus the
helpers tests use to drive it as a user does (``ray job submit``, ``rayplane``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raycluster.local import DEFAULT_PORTS, LocalCluster, free_port, session_members

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO", "agent_model", "cluster_env", "drop_postgres_data", "local_cluster",
           "ray_job_submit", "rayplane"]


def drop_postgres_data(state_dir: Path) -> None:
    """A test platform's PostgreSQL data goes with its temporary state folder. Run as root it
    lives in the system folder the database account can reach, linked from the state folder
    (raycluster/local/postgres.py), which pytest's temp-folder rotation never removes."""
    data = Path(state_dir) / "postgres" / "data"
    if data.is_symlink():
        shutil.rmtree(data.resolve().parent, ignore_errors=True)


def ray_job_submit(env: dict[str, str], *entrypoint: str, resources: dict | None = None,
                   timeout: float = 600, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo>` of ``entrypoint``, waiting for it to finish."""
    import json

    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO)]
    if resources:
        cmd += ["--entrypoint-resources", json.dumps(resources)]
    cmd += [*extra, "--", *entrypoint]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)


def rayplane(env: dict[str, str], *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """``rayplane ARGS`` as a user runs it (the console script of this environment), from the
    repository root, with ``env`` (usually ``cluster_env``)."""
    return subprocess.run([str(Path(sys.executable).parent / "rayplane"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)



@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory):
    state_dir = tmp_path_factory.mktemp("rayplane-state")
    ports = {name: free_port() for name in DEFAULT_PORTS}
    cluster = LocalCluster(state_dir=state_dir, ports=ports, metrics=True, ha=True)
    try:
        cluster.up(timeout=240)
    except BaseException:
        cluster.down()
        raise
    sessions = {proc.pid for proc in cluster.state().processes}
    try:
        yield cluster
    finally:
        cluster.down()
        drop_postgres_data(state_dir)
    # `rayplane down` leaves nothing of what the platform started, HAProxy (a Ray worker's
    # child, reloaded by the tests' deploys) included.
    left = session_members(sessions)
    assert not left, f"processes left after rayplane down: {left}"


@pytest.fixture(scope="session")
def cluster_env(local_cluster: LocalCluster) -> dict[str, str]:
    """Environment for subprocesses that talk to the cluster (ray job submit, SDKs)."""
    env = dict(os.environ)
    env.update(local_cluster.env())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env



@pytest.fixture(scope="module")
def agent_model(local_cluster, cluster_env, tmp_path_factory) -> dict[str, str]:
    """The tiny chat model (tests/support/tiny_model.py) that an agent test module drives,
    deployed with ``rayplane serve up`` from the registry, behind the platform's API key: its
    OpenAI base URL, served name and key file. Module-scoped: its replica holds a unit of the
    a100-mig pool, which the local node has two of, and later modules (the demo's smoke job
    and its task) need both."""
    from tests.support import tiny_model as tm

    registered, app, prefix = "agents-tiny", "agents-model", "/agents-model"
    tm.register_model(tm.cached_tiny_model("1"), registered, tracking_uri=local_cluster.mlflow_uri)
    cfg = tmp_path_factory.mktemp("agents-serve") / "serve.yaml"
    cfg.write_text(tm.serve_config_yaml(name=app, source=f"models:/{registered}@champion",
                                        pool="a100-mig", route_prefix=prefix,
                                        api_key_file=local_cluster.api_key_path))
    out = rayplane(cluster_env, "serve", "up", str(cfg))
    assert out.returncode == 0, out.stderr + out.stdout
    yield {"base_url": f"{local_cluster.serve_url}{prefix}/v1", "model": "tiny-chat",
           "key_file": str(local_cluster.api_key_path)}
    rayplane(cluster_env, "serve", "down", app, timeout=120)

