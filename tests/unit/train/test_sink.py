"""Rank 0's metrics sink and the driver's MLflow calls while the tracking server is down:
nothing is lost (kept, written into the checkpoint, read back, sent once it answers), no
training time is spent waiting, and a server that stays down is one line, not a hang."""

from __future__ import annotations

import time

import pytest

from train import tracking
from train.sink import MetricsSink


def test_a_dead_server_keeps_the_metrics_and_says_so_once(dead_mlflow, tmp_path):
    said: list[str] = []
    sink = MetricsSink(dead_mlflow, "run-1", say=said.append)
    sink.log({"train_loss": 2.5, "lr": 1e-3}, step=50)
    started = time.monotonic()
    assert sink.flush() is False
    sink.log({"train_loss": 2.0}, step=100)
    assert sink.flush() is False
    assert time.monotonic() - started < 5, "a dead server must not cost training time"
    assert len(said) == 1 and f"MLflow at {dead_mlflow} is not answering" in said[0]
    assert "keeping 2 metrics" in said[0]

    sink.write_pending(tmp_path)
    rows = tracking.read_pending(tmp_path)
    assert [(r["key"], r["value"], r["step"]) for r in rows] == [
        ("train_loss", 2.5, 50), ("lr", 1e-3, 50), ("train_loss", 2.0, 100)]
    resumed = MetricsSink(dead_mlflow, "run-1", say=said.append)
    resumed.restore(rows)
    assert resumed.pending_rows() == rows
    assert tracking.read_pending(tmp_path / "nothing") == []


def test_kept_metrics_land_once_when_the_store_answers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start_run(uri, "sink-test", "r", str(tmp_path), {"lr": 1})
    sink = MetricsSink(uri, run.run_id, say=lambda msg: None)
    sink.log({"train_loss": 2.5}, step=50)
    sink.log({"train_loss": 2.0}, step=100)
    kept = sink.pending_rows()
    assert sink.flush() is True and sink.pending == []
    # The driver sends the checkpoint's copy again: the same metrics, no second entry.
    tracking.log_metric_dicts(uri, run.run_id, kept)
    history = tracking.client(uri).get_metric_history(run.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(50, 2.5), (100, 2.0)]


def test_the_driver_fails_with_one_line_when_the_server_stays_down(dead_mlflow):
    said: list[str] = []
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as err:
        tracking.when_up(dead_mlflow, 1.0, "log the model", lambda: None, said.append)
    assert time.monotonic() - started < 5
    assert str(err.value) == (
        f"mlflow.tracking_uri: the MLflow server at {dead_mlflow} went down and did not come "
        "back within 1s (mlflow.wait_s), so this run could not log the model")
    assert said == [f"MLflow at {dead_mlflow} is not answering; waiting up to 1s "
                    "(mlflow.wait_s) to log the model"]


def test_an_error_from_a_server_that_answers_is_raised_as_it_is(tmp_path):
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("bad metric")

    with pytest.raises(ValueError, match="bad metric"):
        tracking.when_up(f"sqlite:///{tmp_path / 'x.db'}", 60, "log", bad)
    assert calls == [1]
