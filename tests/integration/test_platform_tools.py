"""The platform tools against the session's local platform: pool capacity follows Ray's live
state (a placement group holding a unit of a100-mig takes it, stopping its job gives it back),
jobs lists a submitted job, registered_models sees a version registered in its MLflow."""

from __future__ import annotations

import time
import uuid

import pytest

from agents.platform import PLATFORM_TOOLS, PlatformContext, jobs, pool_units, registered_models
from tests.support import tiny_model as tm

pytestmark = pytest.mark.timeout(600)

POOL = "a100-mig"
HOLD = ("import ray, time; ray.init(); "
        "pg = ray.util.placement_group([{'pool:a100-mig': 1}]); ray.get(pg.ready()); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture(scope="module")
def context(cluster_env) -> PlatformContext:
    return PlatformContext.from_env(cluster_env)


@pytest.fixture(scope="module")
def job_client(local_cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(local_cluster.dashboard_url, headers=local_cluster.auth_headers())


def _wait(fn, ok, timeout: float = 90.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"{what}: last value {value}"
        time.sleep(1.0)


def _advertised(local_cluster, resource: str) -> float:
    return sum((n.get("resources_total") or {}).get(resource, 0.0)
               for n in local_cluster.alive_nodes())


def test_pool_units_is_what_the_nodes_advertise(local_cluster, context):
    units = _wait(lambda: pool_units(POOL, context=context),
                  lambda r: r.get("free") is not None, what="usage reported")
    assert units["total"] == _advertised(local_cluster, f"pool:{POOL}") > 0
    assert units["unit"] == "gpu_units"
    assert units["used"] + units["free"] == units["total"]
    cpu = pool_units("cpu", context=context)
    assert cpu["unit"] == "cpus"
    assert cpu["total"] == _advertised(local_cluster, "pool:cpu") > 0


def test_pool_units_follows_a_placement_group(context, job_client):
    before = _wait(lambda: pool_units(POOL, context=context),
                   lambda r: r.get("free") is not None and r["used"] == 0,
                   what="a100-mig idle")
    job = job_client.submit_job(entrypoint=f'python -c "{HOLD}"',
                                submission_id=f"hold-{uuid.uuid4().hex[:8]}")
    try:
        held = _wait(lambda: pool_units(POOL, context=context),
                     lambda r: r.get("used") == 1, what="a unit held")
        assert held["free"] == before["free"] - 1
        assert held["total"] == before["total"]
        # The job holding it is listed as running.
        listed = {j["submission_id"]: j for j in jobs(context=context)["jobs"]}
        assert listed[job]["status"] == "RUNNING"
        assert listed[job]["entrypoint"].startswith('python -c "import ray')
    finally:
        job_client.stop_job(job)
    after = _wait(lambda: pool_units(POOL, context=context),
                  lambda r: r.get("used") == 0, what="the unit given back")
    assert after["free"] == before["free"]


def test_jobs_lists_a_finished_job(context, job_client):
    job = job_client.submit_job(entrypoint="python -c \"print('done')\"",
                                submission_id=f"tools-{uuid.uuid4().hex[:8]}")
    _wait(lambda: job_client.get_job_status(job).value, lambda s: s == "SUCCEEDED",
          timeout=120, what="job finished")
    result = jobs(limit=50, context=context)
    row = next(j for j in result["jobs"] if j["submission_id"] == job)
    assert row["status"] == "SUCCEEDED"
    assert row["start_time"] and row["end_time"] and row["end_time"] >= row["start_time"]
    assert len(jobs(limit=1, context=context)["jobs"]) == 1


def test_registered_models_sees_a_registered_version(local_cluster, context, tmp_path):
    from mlflow import MlflowClient

    name = f"tools-{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    version = tm.register_model(folder, name, tracking_uri=local_cluster.mlflow_uri)
    client = MlflowClient(tracking_uri=local_cluster.mlflow_uri)
    run_id = client.get_model_version(name, version).run_id
    client.log_metric(run_id, "eval_exact_match", 0.93)

    result = registered_models(name, context=context)
    (model,) = result["models"]
    assert model["name"] == name
    assert model["versions"] == [{"version": version, "aliases": ["champion"],
                                  "eval_exact_match": 0.93, "run_id": run_id}]
    everything = registered_models(context=context)
    assert name in {m["name"] for m in everything["models"]}
    missing = registered_models(name + "x", context=context)
    assert f"did you mean '{name}'?" in missing["error"]


def test_tools_from_the_environment(cluster_env, monkeypatch):
    """PLATFORM_TOOLS read the platform from the environment `rayplane env` exports."""
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "RAYPLANE_CATALOG"):
        if key in cluster_env:
            monkeypatch.setenv(key, cluster_env[key])
    tools = {t.__name__: t for t in PLATFORM_TOOLS}
    assert tools["pool_units"](pool=POOL)["total"] > 0
    assert "jobs" in tools["jobs"](limit=3)
    assert "models" in tools["registered_models"]()
