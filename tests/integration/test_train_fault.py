"""Resuming train.fit on the local platform: a stopped run re-submitted under the same name
continues from its last checkpoint in the same MLflow run; the kept checkpoints load.

A worker lost mid-run (its node killed, Ray Train restarting the group from the last
checkpoint, the restart counted) is tests/reliability/test_train_faults.py's; it used to be
here too, as a worker killed by its pid, which exercised the same restart path for 4 minutes
of CI."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import ray_job_submit
from tests.integration.test_train_fit import (
    fit_args,
    job_logs,
    job_request,
    mlflow_client,
    submit_no_wait,
    tail,
    wait_for_checkpoint,
    wait_job,
)
from train.fit import result_from_logs
from train.loop import TRAIN_STATE, TRAIN_STATE_JSON
from train.model import load_model_folder

#: A checkpoint every 50 steps (the CI size's is 100): the stop lands after the first one, and
#: the re-submission trains from there to STEPS, 150 steps of room for the stop to land in.
CHECKPOINT_EVERY = 50
STEPS = 200


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
def test_stopped_run_resubmitted_under_its_name_continues(local_cluster, cluster_env,
                                                          tmp_path):
    name = f"it-resub-{uuid.uuid4().hex[:8]}"
    first = f"{name}-1"
    # Fewer steps than the CI size, checkpointed more often, and a small evaluation: the stop
    # lands after the first checkpoint with room to spare, and the outcome is the resume, not
    # the model.
    args = fit_args(name, tmp_path, "--set", f"steps={STEPS}",
                    "--set", f"checkpoint_every={CHECKPOINT_EVERY}",
                    "--set", "eval.max_examples=20", "--set", "eval.min_exact_match=0",
                    "--set", "mlflow.register_on_pass=false")
    submit_no_wait(cluster_env, first, args)
    wait_for_checkpoint(local_cluster, first, tmp_path / name, CHECKPOINT_EVERY, timeout=600)
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
    assert step >= CHECKPOINT_EVERY
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
