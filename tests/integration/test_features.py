"""The feature store on the session platform (issue 17): ``rayplane features apply`` and
``materialize`` as Ray jobs on the cpu pool (the session fixture ``feature_store_ready``), the
online store (the platform's PostgreSQL) serving the newest values, point-in-time-correct
training data from the Ray offline store, and bad input refused before any job.
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from tests.support.platform import rayplane

POOL_LOAD = ["running_units", "pending_units", "free_units", "gpu_utilization",
             "mean_wait_1h_s"]


def _client(local_cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(local_cluster.dashboard_url, headers=local_cluster.auth_headers())


def _jobs(local_cluster) -> set[str]:
    return {j.submission_id for j in _client(local_cluster).list_jobs()}


def test_apply_and_materialize_run_as_jobs_on_the_cpu_pool(feature_store_ready, local_cluster):
    from raycluster.local.dashboard import node_summary

    apply, materialize = feature_store_ready["apply"], feature_store_ready["materialize"]
    print(f"apply {apply['seconds']}s, materialize {materialize['seconds']}s, materialise "
          f"step inside the job {materialize['result']['seconds']}s")
    pools = {n["node_id"]: n["pool"] for n in map(node_summary, local_cluster.alive_nodes())}
    ran = [j for j in _client(local_cluster).list_jobs()
           if j.entrypoint.startswith("python -m features.jobs ")]
    assert {j.entrypoint.split()[3] for j in ran} >= {"apply", "materialize"}
    assert {pools.get(j.driver_node_id) for j in ran} == {"cpu"}, ran
    assert apply["result"]["objects"] == ["job", "pool", "job_request", "job_outcome",
                                          "pool_load", "job_duration_model"]
    assert feature_store_ready["registry"].is_file()
    assert (feature_store_ready["data"] / "jobs.parquet").is_file()
    # The yaml names the password's variable, never its value.
    config = feature_store_ready["config"].read_text()
    password = (feature_store_ready["state_dir"] / "postgres_password").read_text().strip()
    assert password not in config and "${RAYPLANE_FEAST_DB_PASSWORD}" in config
    assert "type: ray" in config and "type: ray.engine" in config
    read_back = materialize["result"]["read_back"]
    assert read_back["pool_load"] == {"expected": 4, "found": 4}, read_back
    assert all(v["found"] == v["expected"] for v in read_back.values()), read_back


def test_online_pool_load_is_the_newest_snapshot(feature_store_ready, cluster_env):
    snapshots = pd.read_parquet(feature_store_ready["data"] / "pool_load.parquet")
    newest = snapshots.sort_values("event_timestamp").groupby("pool").tail(1).set_index("pool")
    for pool in ("a100-mig",):
        started = time.monotonic()
        out = rayplane(cluster_env, "features", "get", "pool_load", "--entity", f"pool={pool}")
        print(f"rayplane features get pool_load ({pool}): {time.monotonic() - started:.1f}s")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["pool"] == pool
        for name in POOL_LOAD:
            assert got[name] == pytest.approx(float(newest.loc[pool, name])), (pool, name)


def test_online_feature_service_joins_the_job_and_its_pool(feature_store_ready, cluster_env):
    jobs = pd.read_parquet(feature_store_ready["data"] / "jobs.parquet")
    job = jobs.iloc[len(jobs) // 2]
    out = rayplane(cluster_env, "features", "get", "job_duration_model",
                   "-e", f"job_id={int(job.job_id)}", "-e", f"pool={job.pool}")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["requested_units"] == int(job.requested_units)
    assert got["model_size_b"] == pytest.approx(job.model_size_b)
    assert got["free_units"] is not None


def test_training_rows_carry_the_pool_load_of_their_submission_not_a_later_one(
        feature_store_ready, duration_model, tmp_path):
    """Point-in-time correctness through the real Ray offline store, on the rows the
    job-duration model was trained on (the session's train.duration run logs them as its
    artifact): each job's pool_load values are those of the newest snapshot at or before its
    submission, even where the pool's next snapshot (after the submission) changed them."""
    from mlflow import MlflowClient

    from train.duration import TRAINING_DATA

    run_id = duration_model["outcome"]["mlflow_run_id"]
    out_file = MlflowClient(duration_model["tracking_uri"]).download_artifacts(
        run_id, TRAINING_DATA, str(tmp_path))
    rows = pd.read_parquet(out_file)
    jobs = pd.read_parquet(feature_store_ready["data"] / "jobs.parquet")
    assert len(rows) == len(jobs)  # no job lost in the join
    assert not rows[POOL_LOAD].isna().any().any()

    snaps = pd.read_parquet(feature_store_ready["data"] / "pool_load.parquet")
    snaps = snaps.sort_values("event_timestamp")
    rows = rows.sort_values("event_timestamp")
    before = pd.merge_asof(rows[["job_id", "pool", "event_timestamp"]], snaps, by="pool",
                           on="event_timestamp", direction="backward")
    after = pd.merge_asof(rows[["job_id", "pool", "event_timestamp"]], snaps, by="pool",
                          on="event_timestamp", direction="forward", allow_exact_matches=False)
    rows, before, after = (f.set_index("job_id").sort_index() for f in (rows, before, after))
    changed = (after["free_units"] != before["free_units"]) & after["free_units"].notna()
    assert changed.sum() > 500  # plenty of jobs whose pool changed right after submission
    for name in POOL_LOAD:
        assert (rows[name] == before[name]).all(), name
    assert (rows.loc[changed, "free_units"] != after.loc[changed, "free_units"]).all()
    # And the request side: each row carries its own job's units and model size.
    jobs = jobs.set_index("job_id").loc[rows.index]
    assert (rows["requested_units"] == jobs["requested_units"]).all()
    assert (rows["duration_s"] == jobs["duration_s"]).all()


@pytest.mark.parametrize("args, message", [
    (("materialize", "--views", "pool_lod"), "no feature view 'pool_lod' (did you mean "
                                             "'pool_load'?)"),
    (("get", "job_request", "--entity", "job_id=abc"), "job_id is an Int64 key"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_job(local_cluster, cluster_env, args,
                                                         message):
    """(tests/unit/features/test_online.py checks every message; here: nothing submitted.)"""
    submitted = _jobs(local_cluster)
    out = rayplane(cluster_env, "features", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert _jobs(local_cluster) == submitted
