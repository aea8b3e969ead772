"""The platform-history generator (features.data): seeded, the contract's columns and dtypes,
point-in-time-consistent labels a model can learn."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from features import data
from features.repo import POOLS


@pytest.fixture(scope="module")
def history() -> data.PlatformHistory:
    return data.generate(seed=0)


def test_same_seed_same_history_other_seed_other_history(history):
    again = data.generate(seed=0)
    pd.testing.assert_frame_equal(history.jobs, again.jobs)
    pd.testing.assert_frame_equal(history.pool_load, again.pool_load)
    assert not history.jobs["queue_wait_s"].equals(data.generate(seed=1).jobs["queue_wait_s"])


def test_generation_takes_well_under_a_second():
    data.generate(seed=3)  # the catalog is loaded once
    started = time.perf_counter()
    data.generate(seed=2)
    assert time.perf_counter() - started < 1.0


def test_columns_and_dtypes_are_the_contracts(history):
    for frame, columns in ((history.jobs, data.JOB_COLUMNS),
                           (history.pool_load, data.POOL_LOAD_COLUMNS)):
        assert list(frame.columns) == list(columns)
        assert {c: str(t) for c, t in frame.dtypes.items()} == columns


def test_every_catalog_pool_has_a_snapshot_every_10_minutes_for_14_days(history):
    load = history.pool_load
    assert set(load["pool"]) == set(POOLS) == set(history.jobs["pool"])
    for _, snaps in load.groupby("pool"):
        steps = snaps["event_timestamp"].diff().dropna().unique()
        assert list(steps) == [pd.Timedelta(minutes=10)]
        assert len(snaps) == 14 * 144
    assert (load["created"] > load["event_timestamp"]).all()
    capacity = data.pool_capacities()
    total = load["running_units"] + load["free_units"]
    assert (total == load["pool"].map(capacity)).all()
    assert load[["running_units", "pending_units", "free_units"]].ge(0).all().all()


def test_jobs_are_plausible_and_their_outcome_is_recorded_when_they_end(history):
    jobs = history.jobs
    assert 2500 <= len(jobs) <= 3500 and jobs["job_id"].is_unique
    assert jobs["submitted_at"].is_unique  # the Ray offline store collapses equal rows
    assert jobs["requested_units"].isin([1, 2, 4, 8]).all()
    assert (jobs["queue_wait_s"] > 0).all() and (jobs["duration_s"] > 0).all()
    ended = jobs["submitted_at"] + pd.to_timedelta(jobs["queue_wait_s"] + jobs["duration_s"],
                                                   unit="s")
    assert (abs(jobs["created"] - ended) < pd.Timedelta(seconds=1)).all()
    assert jobs["gpu_utilization"].between(0, 1).all()


def _joined(history: data.PlatformHistory) -> pd.DataFrame:
    """Each job with the newest snapshot of its pool at or before its submission."""
    snaps = history.pool_load.drop(columns="created").rename(
        columns={"gpu_utilization": "pool_utilization"}).sort_values("event_timestamp")
    return pd.merge_asof(history.jobs.sort_values("submitted_at"), snaps, by="pool",
                         left_on="submitted_at", right_on="event_timestamp")


def test_a_simple_model_on_the_features_beats_the_mean_by_far(history):
    """Least squares on log labels, trained on the first 80% (by time), MAE on the rest: the
    labels are learnable from what the feature service hands a model."""
    m = _joined(history)
    x = np.column_stack([
        np.log1p(m["requested_units"]), np.log1p(m["model_size_b"]), m["running_units"] / 100,
        m["pending_units"] / 10, m["free_units"] / 100, m["pool_utilization"],
        np.log1p(m["mean_wait_1h_s"]), np.log1p(m["pending_units"]) - np.log1p(m["free_units"]),
        pd.get_dummies(m["pool"]).to_numpy(float), np.ones(len(m))])
    n = int(len(m) * 0.8)
    for label in ("queue_wait_s", "duration_s"):
        y = m[label].to_numpy()
        w, *_ = np.linalg.lstsq(x[:n], np.log1p(y[:n]), rcond=None)
        model = np.abs(np.expm1(x[n:] @ w) - y[n:]).mean()
        mean = np.abs(y[:n].mean() - y[n:]).mean()
        assert model < 0.7 * mean, (label, model, mean)


def test_waits_grow_with_pending_units_and_durations_with_model_size(history):
    m = _joined(history)
    busy = m["pending_units"] > m["free_units"]
    assert m.loc[busy, "queue_wait_s"].median() > 3 * m.loc[~busy, "queue_wait_s"].median()
    big = m["model_size_b"] > m["model_size_b"].median()
    assert m.loc[big, "duration_s"].median() > 1.5 * m.loc[~big, "duration_s"].median()


def test_write_puts_both_files_in_the_folder(history, tmp_path):
    paths = data.write(history, tmp_path / "data")
    assert paths == {"jobs": tmp_path / "data" / "jobs.parquet",
                     "pool_load": tmp_path / "data" / "pool_load.parquet"}
    back = pd.read_parquet(paths["pool_load"])
    pd.testing.assert_frame_equal(back, history.pool_load)
