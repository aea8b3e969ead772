"""TensorFlow/Keras on Ray Train (issue 17), on the session platform with Feast applied and
materialised: `ray job submit` of train.duration trains on two a100-timeslice workers with
MultiWorkerMirroredStrategy from the point-in-time training rows, beats the mean baseline by
the config's margin, is tracked and registered in MLflow (job-duration@candidate) and loads
for prediction; a training worker killed (SIGKILL) after the first checkpoint makes Ray Train
restart the group, which resumes from its last checkpoint, not from epoch 1.

One job does all of it (tests/support/duration.py's session fixture); these tests read its
outcome, the job's logs and MLflow."""

from __future__ import annotations

import re

import pytest

from train.duration_model import TARGETS, load_registered
from train.keras_config import DurationConfig

pytestmark = pytest.mark.slow


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def test_keras_job_beats_the_mean_baseline_and_is_registered(duration_model):
    out = duration_model["outcome"]
    cfg = DurationConfig.load(duration_model["config"])
    assert out is not None, duration_model["logs"][-3000:]
    assert out["epochs"] == cfg.epochs and out["passed"]
    for t in TARGETS:
        assert out["metrics"][f"improvement_{t}"] >= cfg.min_improvement, out["metrics"]
        assert out["metrics"][f"val_mae_{t}"] < out["metrics"][f"baseline_mae_{t}"]
    # The newest 20% of the jobs by submission time were held out.
    total = out["train_rows"] + out["validation_rows"]
    assert out["validation_rows"] == pytest.approx(0.2 * total, abs=1)
    logs = duration_model["logs"]
    assert "MultiWorkerMirroredStrategy with cluster_spec" in logs
    assert "on 2 workers" in logs

    client = mlflow_client(duration_model["tracking_uri"])
    version = client.get_model_version_by_alias("job-duration", "candidate")
    assert version.run_id == out["mlflow_run_id"] and version.version == out["version"]
    assert float(version.tags["val_mae_duration_s"]) < float(
        version.tags["baseline_mae_duration_s"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["num_workers"] == "2" and run.data.tags["pool"] == "a100-timeslice"
    files = {a.path for a in client.list_artifacts(out["mlflow_run_id"], "model")}
    assert files == {"model/model.keras", "model/features.json"}
    # Rank 0 logged every epoch, the ones trained again after the restart included.
    history = client.get_metric_history(out["mlflow_run_id"], "val_mae_duration_s")
    assert {m.step for m in history} >= set(range(1, cfg.epochs + 1))


def test_a_killed_tf_worker_resumes_from_its_last_checkpoint(duration_model):
    out = duration_model["outcome"]
    cfg = DurationConfig.load(duration_model["config"])
    logs = duration_model["logs"]
    assert out["restarts"] == 1 and out["resubmissions"] == 0, out
    resumed = re.search(r"worker restart 1: resuming from checkpoint epoch (\d+)", logs)
    assert resumed, logs[-4000:]
    epoch = int(resumed[1])
    # Not from scratch: from the checkpoint recorded when the worker died (or a later one).
    assert epoch >= 1 and out["resumed_from_epoch"] == epoch
    assert epoch >= duration_model["epoch_at_kill"]
    assert f"epochs {epoch + 1}..{cfg.epochs} on 2 workers" in logs
    assert out["epochs"] == cfg.epochs

    client = mlflow_client(duration_model["tracking_uri"])
    history = client.get_metric_history(out["mlflow_run_id"], "resumed_from_epoch")
    assert [m.value for m in history] == [epoch]
    print(f"worker killed after epoch {duration_model['epoch_at_kill']}, resumed from epoch "
          f"{epoch}; {duration_model['seconds']}")


def test_the_registered_model_predicts_seconds(duration_model):
    model = load_registered(duration_model["tracking_uri"], "job-duration", "candidate")
    assert model.version == duration_model["outcome"]["version"]
    base = {"requested_units": 2, "model_size_b": 7.0, "running_units": 10,
            "gpu_utilization": 0.6, "mean_wait_1h_s": 60.0, "pool": "h100-timeslice"}
    idle, busy = model.predict([{**base, "pending_units": 0, "free_units": 8},
                                {**base, "pending_units": 30, "free_units": 0}])
    for pred in (idle, busy):
        assert set(pred) == set(TARGETS) and all(v >= 0 for v in pred.values())
    # The labels make waits grow with pending work: the model learnt as much.
    assert busy["queue_wait_s"] > idle["queue_wait_s"]
