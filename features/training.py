"""Training data from the feature store: the labelled jobs joined point-in-time with the
features the job-duration model reads (feature service ``job_duration_model``).

Each labelled job is an entity row (``job_id``, ``pool``, ``event_timestamp`` = its
submission, its labels ``queue_wait_s`` and ``duration_s``); Feast's
``get_historical_features`` on the Ray offline store joins to it the job's request and the
*latest pool snapshot at or before the submission* -- never a later one, which the model
could not have seen when the job was submitted (tests/integration/test_features.py checks
this against the raw snapshots). The join runs as Ray Data operations on the cluster the
caller is connected to; the result is a ``ray.data.Dataset`` that Ray Train shards
(train.duration).

Two contrib-store details handled here (feast 0.67, docs/features.md): the entity rows carry
``submitted_at`` beside ``event_timestamp`` (the Ray store's per-view timestamp column is
bound late in a closure and otherwise missing for ``job_request``), and the Ray store does not
apply the views' TTL to historical rows; ``pool_load`` snapshots are 10 minutes apart, so a
job always sees one at most 10 minutes old.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd

from features.data import JOBS_FILE
from features.repo import FEATURE_SERVICE
from features.store import connect_ray, data_uri

#: Model inputs, in this order (train.duration and the agents' tool build rows from them).
FEATURE_COLUMNS = ("requested_units", "model_size_b", "running_units", "pending_units",
                   "free_units", "gpu_utilization", "mean_wait_1h_s")
#: What the model predicts (outcomes of the job, from the jobs' own records).
LABEL_COLUMNS = ("queue_wait_s", "duration_s")
COLUMNS = (*FEATURE_COLUMNS, "pool", *LABEL_COLUMNS, "job_id", "event_timestamp")


def labelled_jobs(store, start: datetime | None = None,
                  end: datetime | None = None) -> pd.DataFrame:
    """The entity rows: every finished job submitted in [start, end) with its labels."""
    import ray

    jobs = ray.data.read_parquet(f"{data_uri(store)}/{JOBS_FILE}").select_columns(
        ["job_id", "pool", "submitted_at", *LABEL_COLUMNS]).to_pandas()
    jobs["submitted_at"] = pd.to_datetime(jobs["submitted_at"], utc=True)
    if start is not None:
        jobs = jobs[jobs["submitted_at"] >= pd.Timestamp(start)]
    if end is not None:
        jobs = jobs[jobs["submitted_at"] < pd.Timestamp(end)]
    jobs = jobs.dropna(subset=list(LABEL_COLUMNS))
    return jobs.assign(event_timestamp=jobs["submitted_at"]).reset_index(drop=True)


def historical(store, entity_rows: pd.DataFrame, features=None):
    """Feast's point-in-time join of ``entity_rows`` (``event_timestamp`` plus join keys) with
    ``features`` (default: the feature service) on the Ray offline store; a ray Dataset."""
    connect_ray()
    if "submitted_at" not in entity_rows:
        entity_rows = entity_rows.assign(submitted_at=entity_rows["event_timestamp"])
    job = store.get_historical_features(
        entity_df=entity_rows,
        features=features or store.get_feature_service(FEATURE_SERVICE))
    return job.to_ray_dataset()


def _tidy(batch: pd.DataFrame) -> pd.DataFrame:
    """Plain dtypes (float features and labels, str pool, int id) and only the contract's
    columns; rows without a pool snapshot before them are dropped."""
    out = pd.DataFrame({c: pd.to_numeric(batch[c], errors="coerce").astype("float64")
                        for c in (*FEATURE_COLUMNS, *LABEL_COLUMNS)})
    out["pool"] = batch["pool"].astype(str).astype(object)
    out["job_id"] = batch["job_id"].astype("int64")
    out["event_timestamp"] = pd.to_datetime(batch["event_timestamp"], utc=True)
    return out.dropna(subset=list(FEATURE_COLUMNS))[list(COLUMNS)].reset_index(drop=True)


def training_dataset(store, start: datetime | None = None, end: datetime | None = None):
    """The job-duration model's training data as a ``ray.data.Dataset`` with ``COLUMNS``:
    features as of each job's submission (point-in-time), its pool, its labels."""
    connect_ray()
    rows = labelled_jobs(store, start, end)
    return historical(store, rows).map_batches(_tidy, batch_format="pandas")


__all__ = ["COLUMNS", "FEATURE_COLUMNS", "LABEL_COLUMNS", "historical", "labelled_jobs",
           "training_dataset"]
