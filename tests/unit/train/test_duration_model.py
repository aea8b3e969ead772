"""train/duration_model.py on a tiny saved Keras model (no Ray): the folder train.duration logs
loads and predicts seconds from raw feature rows; a row the model cannot read is one line
naming the field; load_registered finds the alias's version through MLflow's client."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raycluster.spec import SpecError
from train.duration_model import (
    FEATURES_FILE,
    MODEL_FILE,
    DurationModel,
    FeatureSpec,
    decode,
    encode,
    encode_targets,
    load_registered,
)

COLUMNS = ("requested_units", "model_size_b", "running_units", "pending_units", "free_units",
           "gpu_utilization", "mean_wait_1h_s")
POOLS = ("cpu", "a100-timeslice", "a100-mig", "h100-timeslice")
SPEC = FeatureSpec(COLUMNS, POOLS)


def row(pool: str = "a100-timeslice", **over) -> dict:
    base = {"requested_units": 2, "model_size_b": 7.0, "running_units": 10,
            "pending_units": 3, "free_units": 1, "gpu_utilization": 0.7,
            "mean_wait_1h_s": 120.0, "pool": pool}
    return {**base, **over}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny untrained model saved as train.duration's loop saves it, the output biases set
    so the prediction is known: log1p outputs 3 and 7 -> expm1 seconds."""
    from train.keras_loop import build_model

    folder = tmp_path_factory.mktemp("duration-model")
    model = build_model(SPEC, [0.0] * 7, [1.0] * 7, [4], 1e-3, seed=0)
    for target, bias in (("queue_wait_s", 3.0), ("duration_s", 7.0)):
        layer = model.get_layer(target)
        kernel, _ = layer.get_weights()
        layer.set_weights([np.zeros_like(kernel), np.array([bias], dtype=np.float32)])
    model.save(folder / MODEL_FILE)
    (folder / FEATURES_FILE).write_text(SPEC.to_json())
    return folder


def test_a_saved_model_predicts_seconds_from_raw_rows(model_folder):
    model = DurationModel.from_folder(model_folder)
    out = model.predict([row(), row("h100-timeslice", requested_units=8)])
    assert len(out) == 2
    for pred in out:
        assert set(pred) == {"queue_wait_s", "duration_s"}
        assert pred["queue_wait_s"] == pytest.approx(math.expm1(3.0), rel=1e-4)
        assert pred["duration_s"] == pytest.approx(math.expm1(7.0), rel=1e-4)
    assert model.predict([]) == []


def test_an_unknown_pool_is_one_line_naming_it(model_folder):
    model = DurationModel.from_folder(model_folder)
    with pytest.raises(SpecError, match=r"^rows.pool: 'h100-timeslise' is not a pool the "
                                        r"model knows \(did you mean 'h100-timeslice'\?\)"):
        model.predict([row("h100-timeslise")])


def test_a_missing_feature_is_one_line_naming_it(model_folder):
    model = DurationModel.from_folder(model_folder)
    bad = row()
    del bad["free_units"]
    with pytest.raises(SpecError, match=r"^rows: feature 'free_units' is missing") as err:
        model.predict([row(), bad])
    assert err.value.field == "rows.free_units"


def test_a_folder_without_the_model_files_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"^model: .* lacks model.keras or features.json"):
        DurationModel.from_folder(tmp_path)


def test_encoding_orders_columns_and_one_hot_pools_as_features_json_says():
    batch = {c: np.array([i + 1.0, i + 2.0]) for i, c in enumerate(COLUMNS)}
    batch["pool"] = np.array(["cpu", "h100-timeslice"])
    inputs = encode(batch, SPEC)
    assert inputs["numeric"].dtype == np.float32 and inputs["numeric"].shape == (2, 7)
    assert inputs["numeric"][0].tolist() == [float(i + 1) for i in range(7)]
    assert inputs["pool"].tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]
    targets = encode_targets({"queue_wait_s": [0.0, 99.0], "duration_s": [9.0, -5.0]}, SPEC)
    np.testing.assert_allclose(targets, [[0.0, math.log(10.0)], [math.log(100.0), 0.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(decode(targets, SPEC), [[0.0, 9.0], [99.0, 0.0]], rtol=1e-5)


def test_load_registered_downloads_the_alias_version_and_predicts(model_folder, tmp_path):
    from train import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = c.create_experiment("unit", artifact_location=str(tmp_path / "artifacts"))
    run = c.create_run(exp)
    tracking.log_model_folder(uri, run.info.run_id, model_folder, (MODEL_FILE, FEATURES_FILE))
    version = tracking.register(uri, "job-duration", run.info.run_id)
    model = load_registered(uri)
    assert model.version == version and model.source == "models:/job-duration@candidate"
    assert model.predict([row()])[0]["duration_s"] == pytest.approx(math.expm1(7.0), rel=1e-4)
    with pytest.raises(SpecError, match=r"^model: no version of 'job-duration' has alias "
                                        r"'champion'"):
        load_registered(uri, alias="champion")
