"""A Ray Tune sweep of the CI size submitted with `ray job submit`: Optuna proposes, ASHA
stops lagging trials before their last step, the best trial beats the worst, every trial is
an MLflow child run of the sweep, and the best config + model are written out and
registerable."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from tests.integration.conftest import ray_job_submit, rayplane
from tests.integration.test_train_fit import mlflow_client, tail
from train.config import TrainConfig
from train.model import MODEL_FILES
from train.tracking import PARENT_TAG
from train.tune import SweepConfig

SWEEP = "train/configs/tune-ci.yaml"


@pytest.mark.slow
def test_asha_sweep_stops_trials_early_and_finds_a_better_config(local_cluster, cluster_env,
                                                                 tmp_path):
    name = f"it-tune-{uuid.uuid4().hex[:8]}"
    proc = ray_job_submit(cluster_env, "python", "-m", "train.tune",
                          "--config", SWEEP, "--set", f"name={name}",
                          "--set-base", f"storage_path={tmp_path}", timeout=1500)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 80)
    line = re.search(r"RAYPLANE_TUNE_RESULT (\{.*\})", proc.stdout)
    assert line, tail(proc.stdout)
    result = json.loads(line[1])
    summary = json.loads((tmp_path / name / "best" / "sweep.json").read_text())
    trials = summary["trials"]
    sweep = SweepConfig.load(SWEEP)
    assert len(trials) == result["trials"] == sweep.num_samples
    assert all(t["error"] is None for t in trials), [t["error"] for t in trials]

    full = sweep.base_config()  # the trials' steps: the base config with the sweep's overrides
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped, "ASHA stopped no trial"
    assert all(t["step"] < full.steps for t in stopped)
    assert any(t["step"] == full.steps for t in trials), "no trial ran to the end"
    assert result["best_val_loss"] < result["worst_val_loss"]

    best = TrainConfig.load(result["best_config"])
    assert best.lr == summary["best"]["config"]["lr"]
    assert best.model.n_embd == summary["best"]["config"]["n_embd"]
    assert {p.name for p in (tmp_path / name / "best" / "model").iterdir()} == set(MODEL_FILES)

    client = mlflow_client(local_cluster)
    children = client.search_runs(
        [client.get_experiment_by_name(best.mlflow.experiment).experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{result['mlflow_run_id']}'")
    assert len(children) == sweep.num_samples
    assert all("val_loss" in r.data.metrics for r in children)
    assert {r.info.status for r in children if r.data.tags.get("stopped_early") == "True"} \
        == {"KILLED"}
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.metrics["best_val_loss"] == result["best_val_loss"]
    assert parent.data.metrics["stopped_early"] == len(stopped)

    # The sweep's best model is registerable from its run.
    env = {**cluster_env, "MLFLOW_TRACKING_URI": local_cluster.mlflow_uri}
    model = f"it-sweep-{uuid.uuid4().hex[:6]}"
    reg = rayplane(env, "models", "register", result["mlflow_run_id"], "--name", model)
    assert reg.returncode == 0, reg.stderr
    assert client.get_model_version_by_alias(model, "candidate").version == "1"
