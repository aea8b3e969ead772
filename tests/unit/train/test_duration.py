"""train.duration without Ray: bad input is one line naming the field and exit 2 before Ray
starts (config fields, a pool the run does not fit, MLflow down); the time split holds the
newest jobs out; the normalisation and the baseline come from the training part only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycluster.catalog import load_catalog
from raycluster.spec import SpecError
from train import duration
from train.duration_model import TARGETS, FeatureSpec
from train.keras_config import DurationConfig

REPO = Path(__file__).resolve().parents[3]
CONFIG = str(REPO / "train" / "configs" / "duration.yaml")
CI_CONFIG = str(REPO / "train" / "configs" / "duration-ci.yaml")
COLUMNS = ("requested_units", "model_size_b", "running_units", "pending_units", "free_units",
           "gpu_utilization", "mean_wait_1h_s")
POOLS = ("cpu", "a100-timeslice", "a100-mig", "h100-timeslice")


def run_main(argv, capsys) -> tuple[int, str]:
    code = duration.main(argv)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return code, err


def frame(n: int = 500, seed: int = 0) -> pd.DataFrame:
    """Rows shaped like features.training.training_dataset's, submission times shuffled."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-11-01", tz="UTC")
    data = {c: rng.uniform(0, 10, n) for c in COLUMNS}
    data.update(pool=rng.choice(POOLS, n), job_id=np.arange(n, dtype=np.int64),
                event_timestamp=start + pd.to_timedelta(rng.permutation(n) * 60, unit="s"),
                queue_wait_s=rng.lognormal(3, 1, n), duration_s=rng.lognormal(7, 1, n))
    return pd.DataFrame(data)


@pytest.mark.parametrize("overrides, field", [
    (["epochs=0"], "epochs"),
    (["min_improvement=1.5"], "min_improvement"),
    (["hidden=[64, 0]"], "hidden"),
    (["data.validation_fraction=0"], "data.validation_fraction"),
    (["lr=-1"], "lr"),
    (["name=Bad Name"], "name"),
    (["storage_path=relative/runs"], "storage_path"),
    (["data.start=2026-11-02T00:00:00Z", "data.end=2026-11-01T00:00:00Z"], "data"),
    (["epochz=3"], "epochz"),
])
def test_a_bad_field_is_one_line_naming_it_and_exit_2(overrides, field, capsys, tmp_path):
    argv = ["--config", CONFIG, "--set", f"storage_path={tmp_path}"]
    for item in overrides:
        argv += ["--set", item]
    code, err = run_main(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and field in err, err


def test_more_workers_than_the_pool_holds_is_refused_before_ray(capsys, tmp_path):
    pool = load_catalog().pool("a100-timeslice", "pool")
    workers = pool.max_workers + 1
    code, err = run_main(["--config", CONFIG, "--set", f"num_workers={workers}",
                          "--set", f"storage_path={tmp_path}"], capsys)
    assert code == 2
    assert err.startswith(f"error: num_workers: {workers} is more than pool 'a100-timeslice' "
                          f"can hold ({pool.max_workers} = "), err


def test_unknown_pool_names_the_field(capsys, tmp_path):
    code, err = run_main(["--config", CONFIG, "--set", "pool=h100-timeslise",
                          "--set", f"storage_path={tmp_path}"], capsys)
    assert code == 2
    assert err.startswith("error: pool: 'h100-timeslise' is not a pool (did you mean "
                          "'h100-timeslice'?)"), err


def test_mlflow_down_is_refused_before_ray(capsys, tmp_path, dead_mlflow):
    code, err = run_main(["--config", CI_CONFIG, "--set", f"storage_path={tmp_path}",
                          "--set", f"mlflow.tracking_uri={dead_mlflow}"], capsys)
    assert code == 2
    assert err.startswith(f"error: mlflow.tracking_uri: no MLflow server answers at "
                          f"{dead_mlflow}"), err


def test_a_missing_config_file_is_one_line(capsys, tmp_path):
    code, err = run_main(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "no such file" in err


def test_shipped_configs_parse_with_two_workers_on_a100_timeslice():
    for path in (CONFIG, CI_CONFIG):
        cfg = DurationConfig.load(path)
        assert (cfg.pool, cfg.num_workers) == ("a100-timeslice", 2)
        assert cfg.mlflow.registered_model == "job-duration"


def test_the_newest_jobs_are_held_out_and_the_split_is_deterministic():
    rows = frame(500)
    train, val = duration.split_by_time(rows, 0.2)
    assert (len(train), len(val)) == (400, 100)
    assert train["event_timestamp"].max() < val["event_timestamp"].min()
    again_train, _ = duration.split_by_time(rows.sample(frac=1.0, random_state=3), 0.2)
    assert again_train["job_id"].tolist() == train["job_id"].tolist()


def test_normalisation_and_baseline_come_from_the_training_part_only(monkeypatch):
    import ray.data

    # No Ray here: the datasets are the frames themselves.
    monkeypatch.setattr(ray.data, "from_pandas", lambda df: df)
    rows = frame(500)
    cfg = DurationConfig.parse({"name": "unit", "storage_path": "/tmp/unit-runs"})
    splits = duration.prepare(rows, cfg, FeatureSpec(COLUMNS, POOLS))
    train, _ = duration.split_by_time(rows, 0.2)
    assert splits.train_rows == 400 and splits.validation_rows == 100
    assert np.allclose(splits.mean, train[list(COLUMNS)].mean().to_numpy())
    for t in TARGETS:
        assert splits.baseline[f"train_mean_{t}"] == pytest.approx(train[t].mean())
    assert list(splits.train.columns) == [*COLUMNS, "pool", *TARGETS]


def test_too_few_labelled_jobs_is_one_line_naming_data():
    cfg = DurationConfig.parse({"name": "unit", "storage_path": "/tmp/unit-runs"})
    with pytest.raises(SpecError, match=r"^data: 50 labelled jobs .* data.min_rows \(200\)"):
        duration.prepare(frame(50), cfg, FeatureSpec(COLUMNS, POOLS))


def test_the_gate_needs_both_targets_to_beat_the_baseline_by_the_margin():
    cfg = DurationConfig.parse({"name": "unit", "storage_path": "/tmp/unit-runs",
                                "min_improvement": 0.2})
    assert duration.passed_gate({"improvement_queue_wait_s": 0.5,
                                 "improvement_duration_s": 0.2}, cfg)
    assert not duration.passed_gate({"improvement_queue_wait_s": 0.5,
                                     "improvement_duration_s": 0.19}, cfg)
    assert not duration.passed_gate({"improvement_queue_wait_s": 0.5}, cfg)


def test_result_line_round_trips():
    line = duration.RESULT_PREFIX + '{"passed": true, "restarts": 1}'
    assert duration.result_from_logs(f"noise\n{line}\nmore") == {"passed": True, "restarts": 1}


@pytest.mark.parametrize("submission, restarts, resubmissions", [
    ("same", 2, 0),     # Ray restarted the worker group within the submission
    ("other", 1, 1),    # the run name was submitted again
])
def test_resume_counts_a_restart_or_a_resubmission_from_the_checkpoint(
        submission, restarts, resubmissions, monkeypatch, tmp_path):
    import json

    import ray.train

    from train.keras_loop import STATE_FILE, resume_state

    for name in ("model.keras", "features.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / STATE_FILE).write_text(json.dumps(
        {"epoch": 7, "restarts": 1, "resubmissions": 0, "submission": "same"}))
    checkpoint = ray.train.Checkpoint.from_directory(str(tmp_path))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    state, folder = resume_state({"submission": submission})
    assert state["epoch"] == 7 and folder is not None and (folder / "model.keras").is_file()
    assert (state["restarts"], state["resubmissions"]) == (restarts, resubmissions)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert resume_state({"submission": "new"}) == (
        {"epoch": 0, "restarts": 0, "resubmissions": 0, "submission": "new"}, None)
