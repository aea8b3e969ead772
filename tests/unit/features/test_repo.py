"""The feature repository (features.repo): the Feast objects built from its declaration."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from features import data, jobs
from features.repo import FEATURE_SERVICE, POOL_LOAD_TTL, feature_objects


def test_feast_objects_follow_the_declaration():
    from feast import Entity, FeatureService, FeatureView

    objects = {o.name: o for o in feature_objects("s3://bucket/features/data")}
    assert [n for n, o in objects.items() if isinstance(o, Entity)] == ["job", "pool"]
    views = {n: o for n, o in objects.items() if isinstance(o, FeatureView)}
    assert views["pool_load"].ttl == timedelta(hours=1)
    assert views["pool_load"].batch_source.path == "s3://bucket/features/data/pool_load.parquet"
    # Outcomes exist from the end of the job on, requests from its submission.
    assert views["job_outcome"].batch_source.timestamp_field == "created"
    assert views["job_request"].batch_source.timestamp_field == "submitted_at"
    assert views["job_request"].batch_source.created_timestamp_column == "created"
    service = objects[FEATURE_SERVICE]
    assert isinstance(service, FeatureService)
    assert {p.name: [f.name for f in p.features] for p in service.feature_view_projections} == {
        "job_request": ["requested_units", "model_size_b"],
        "pool_load": ["running_units", "pending_units", "free_units", "gpu_utilization",
                      "mean_wait_1h_s"]}


def test_apply_regenerates_a_history_older_than_the_pool_load_ttl(tmp_path):
    assert jobs._data_state(str(tmp_path)) == "missing"
    now = pd.Timestamp.now(tz="UTC").floor(data.SNAPSHOT_EVERY)
    data.write(data.generate(days=1, end=now.to_pydatetime()), tmp_path)
    assert jobs._data_state(str(tmp_path)) == "fresh"
    old = now - POOL_LOAD_TTL - pd.Timedelta(minutes=10)
    data.write(data.generate(days=1, end=old.to_pydatetime()), tmp_path)
    assert jobs._data_state(str(tmp_path)) == "stale"
