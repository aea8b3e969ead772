"""Fault tolerance of train.fit on the local platform: a training worker killed by its pid
mid-run is restarted by Ray Train and continues from its last checkpoint (the step counter
goes on, the restart is counted); a stopped run re-submitted under the same name continues
from its last checkpoint in the same MLflow run; the kept checkpoints load."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import ray_job_submit
from tests.integration.test_train_fit import (
    STEPS,
    fit_args,
    job_logs,
    job_request,
    mlflow_client,
    os_pid_alive,
    submit_no_wait,
    tail,
    train_worker_pids,
    wait_for_checkpoint,
    wait_job,
)
from train.fit import result_from_logs
from train.loop import TRAIN_STATE, TRAIN_STATE_JSON
from train.model import load_model_folder


def checkpoints_load(run_dir: Path, keep: int) -> list[int]:
    """Every kept checkpoint loads (model, tokenizer, optimizer state) and is the step its
    name says; returns the steps."""
    ckpts = sorted(p for p in run_dir.glob("checkpoint_[0-9]*") if p.is_dir())
    assert 1 <= len(ckpts) <= keep + 1, ckpts  # best `keep` by val loss, plus the latest
    steps = []
    for ckpt in ckpts:
        state = json.loads((ckpt / TRAIN_STATE_JSON).read_text())
        assert ckpt.name == f"checkpoint_{state['step']:06d}"
        model, tok = load_model_folder(ckpt)
        assert model.config.n_layer == 2 and tok.eos_token == "<|end|>"
        assert "optimizer" in torch.load(ckpt / TRAIN_STATE, weights_only=True)
        steps.append(state["step"])
    return steps


@pytest.mark.slow
def test_killed_worker_resumes_from_its_last_checkpoint(local_cluster, cluster_env,
                                                        tmp_path):
    name = f"it-kill-{uuid.uuid4().hex[:8]}"
    sid = f"{name}-job"
    # The CI size's steps: the run is still going when its first checkpoint (100) lands.
    submit_no_wait(cluster_env, sid, fit_args(name, tmp_path,
                                              "--set", "mlflow.register_on_pass=false"))
    wait_for_checkpoint(local_cluster, sid, tmp_path / name, 100, timeout=600)
    pids = train_worker_pids(local_cluster, sid)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os_pid_alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert wait_job(local_cluster, sid, timeout=900) == "SUCCEEDED", tail(job_logs(
        local_cluster, sid))
    logs = job_logs(local_cluster, sid)
    resumed = re.search(r"worker restart 1: resuming from checkpoint step (\d+)", logs)
    assert resumed, tail(logs)
    step = int(resumed[1])
    assert step >= 100 and step % 100 == 0
    assert f"steps {step + 1}..{STEPS}" in logs, "the step counter restarted"
    outcome = result_from_logs(logs)
    assert outcome["steps"] == STEPS and outcome["restarts"] == 1

    client = mlflow_client(local_cluster)
    run_id = outcome["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["restarts"] == 1
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [step]
    assert train_worker_pids(local_cluster, sid) == []
    kept = checkpoints_load(tmp_path / name, keep=2)
    assert STEPS in kept  # the latest is always kept


@pytest.mark.slow
def test_stopped_run_resubmitted_under_its_name_continues(local_cluster, cluster_env,
                                                          tmp_path):
    name = f"it-resub-{uuid.uuid4().hex[:8]}"
    first = f"{name}-1"
    args = fit_args(name, tmp_path, "--set", "mlflow.register_on_pass=false")
    submit_no_wait(cluster_env, first, args)
    wait_for_checkpoint(local_cluster, first, tmp_path / name, 100, timeout=600)
    job_request(local_cluster, "POST", f"/api/jobs/{first}/stop")
    assert wait_job(local_cluster, first, timeout=120) == "STOPPED"
    first_logs = job_logs(local_cluster, first)
    run_id = re.search(r"MLflow run (\w+) \(new\)", first_logs)[1]
    assert not (tmp_path / name / f"checkpoint_{STEPS:06d}").exists()

    proc = ray_job_submit(cluster_env, *args, timeout=900)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    assert f"MLflow run {run_id} (continued)" in proc.stdout
    resumed = re.search(rf"run '{name}' re-submitted: continuing from checkpoint step (\d+)",
                        proc.stdout)
    assert resumed, tail(proc.stdout)
    step = int(resumed[1])
    assert step >= 100
    assert f"steps {step + 1}..{STEPS}" in proc.stdout
    outcome = result_from_logs(proc.stdout)
    assert outcome["mlflow_run_id"] == run_id
    assert outcome["steps"] == STEPS and outcome["resubmissions"] == 1
    assert outcome["restarts"] == 0

    client = mlflow_client(local_cluster)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run_id, "train_loss")
    assert max(m.step for m in losses) == STEPS and min(m.step for m in losses) == 50
    checkpoints_load(tmp_path / name, keep=2)
