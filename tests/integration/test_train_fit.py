"""`ray job submit` of train.fit on the local platform (token auth on): the run completes, its
MLflow run holds params, per-step metrics and the model folder, a version with alias
`candidate` is registered, `rayplane models promote` moves `champion` and the champion
downloads as the model folder of docs/model-format.md. A run the local cluster cannot hold is
refused before any worker starts. W&B (offline) gets the same metrics."""

from __future__ import annotations

import json
import struct
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, ray_job_submit, rayplane
from train.config import TrainConfig
from train.fit import result_from_logs
from train.model import MODEL_FILES

CI = "train/configs/ci.yaml"
# The CI size (its steps, a checkpoint every 100) on a smaller corpus: quicker to generate.
QUICK = ("--set", "data.train_size=2000")
STEPS = TrainConfig.from_file(REPO / CI).steps


def fit_args(name: str, storage: Path, *extra: str) -> list[str]:
    return ["python", "-m", "train.fit", "--config", CI, "--set", f"name={name}",
            "--set", f"storage_path={storage}", *QUICK, *extra]


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def mlflow_client(cluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cluster.mlflow_uri, registry_uri=cluster.mlflow_uri)


# -- jobs through the dashboard's REST API (what `ray job status/logs/stop` call) ---------


def job_request(cluster, method: str, path: str) -> dict:
    import urllib.request

    req = urllib.request.Request(f"{cluster.dashboard_url}{path}", method=method,
                                 headers=cluster.auth_headers())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def job_status(cluster, sid: str) -> str:
    return job_request(cluster, "GET", f"/api/jobs/{sid}")["status"]


def job_logs(cluster, sid: str) -> str:
    return job_request(cluster, "GET", f"/api/jobs/{sid}/logs")["logs"]


def wait_job(cluster, sid: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(cluster, sid)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {sid} still {status} after {timeout:.0f}s:\n"
                         f"{tail(job_logs(cluster, sid))}")


def submit_no_wait(env: dict, sid: str, args: list[str]) -> None:
    proc = ray_job_submit(env, *args, extra=("--no-wait", "--submission-id", sid), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def wait_for_checkpoint(cluster, sid: str, run_dir: Path, step: int, timeout: float) -> Path:
    """The checkpoint of ``step`` once it is complete (its train_state.json written) and Ray
    Train has recorded it in the run's checkpoint manager snapshot, which is what a
    re-submission under the same name restores from: stopping the job between the two would
    leave a folder that no later run knows of."""
    ckpt = run_dir / f"checkpoint_{step:06d}"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (ckpt / "train_state.json").is_file() and ckpt.name in recorded_checkpoints(snapshot):
            return ckpt
        if job_status(cluster, sid) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    raise AssertionError(f"no {ckpt.name} within {timeout:.0f}s:\n{tail(job_logs(cluster, sid))}")


def recorded_checkpoints(snapshot: Path) -> set[str]:
    """Checkpoint folder names in a Ray Train checkpoint manager snapshot (empty while the
    file is missing or half written)."""
    try:
        state = json.loads(snapshot.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return set()
    return {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}


def read_wandb_history(path: Path) -> list[dict[str, str]]:
    """History rows of an offline W&B run file (its LevelDB-style record log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json
                             for i in record.history.item})
    return rows


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitted_run_is_tracked_registered_and_promotable(local_cluster, cluster_env,
                                                             tmp_path):
    name = f"it-fit-{uuid.uuid4().hex[:8]}"
    model_name = f"it-model-{uuid.uuid4().hex[:8]}"
    wandb_dir = tmp_path / "wandb"
    proc = ray_job_submit(cluster_env, *fit_args(
        name, tmp_path, "--set", f"mlflow.registered_model={model_name}",
        "--set", "wandb.project=rayplane-it", "--set", f"wandb.dir={wandb_dir}"), timeout=900)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    # Progress reaches the submitter, once (not once per local node's log monitor).
    assert proc.stdout.count(f"[rank 0] step {STEPS}/{STEPS}") == 1, tail(proc.stdout)
    outcome = result_from_logs(proc.stdout)
    assert outcome and outcome["steps"] == STEPS and outcome["passed"]

    client = mlflow_client(local_cluster)
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_layer"] == "2" and run.data.params["steps"] == str(STEPS)
    assert run.data.tags["pool"] == "a100-timeslice" and run.data.tags["local"] == "True"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(50, STEPS + 1, 50))
    assert losses[-1].value < losses[0].value, "the model did not learn"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == list(
        range(100, STEPS + 1, 100))
    assert run.data.metrics["eval_exact_match"] == pytest.approx(outcome["eval"][
        "eval_exact_match"])
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert set(MODEL_FILES) <= artifacts

    candidate = client.get_model_version_by_alias(model_name, "candidate")
    assert candidate.version == outcome["version"]
    assert candidate.source == f"runs:/{run.info.run_id}/model"

    env = {**cluster_env, "MLFLOW_TRACKING_URI": local_cluster.mlflow_uri}
    promoted = rayplane(env, "models", "promote", model_name, candidate.version)
    assert promoted.returncode == 0, promoted.stderr
    assert f"{model_name}@champion -> version {candidate.version}" in promoted.stdout
    listed = json.loads(rayplane(env, "models", "list", model_name, "--json").stdout)
    assert listed == [{**listed[0], "model": model_name, "version": candidate.version,
                       "aliases": ["candidate", "champion"], "run_id": run.info.run_id}]
    wrong = rayplane(env, "models", "promote", model_name, "99")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (f"error: version: '99' is not a version of "
                                    f"'{model_name}'; versions: {candidate.version}")

    # What a serve config's models:/NAME@champion resolves to: the model folder.
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlflow.set_tracking_uri(local_cluster.mlflow_uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}@champion",
                                                      dst_path=str(tmp_path / "dl")))
    assert set(MODEL_FILES) <= {p.name for p in folder.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(folder))
    AutoModelForCausalLM.from_pretrained(str(folder))
    assert tok.chat_template and tok.eos_token == "<|end|>"

    # W&B offline: Ray's integration on rank 0 logged the same per-step metrics.
    runs = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    rows = [r for r in read_wandb_history(runs[0]) if "train_loss" in r]
    assert [int(r["_step"]) for r in rows] == list(range(50, STEPS + 1, 50))


def test_more_workers_than_the_local_cluster_holds_fails_before_any_worker(
        local_cluster, cluster_env, tmp_path):
    workers = local_cluster.workers_per_pool + 1
    proc = ray_job_submit(cluster_env, *fit_args("it-too-many", tmp_path,
                                                 "--set", f"num_workers={workers}"),
                          timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert (f"error: num_workers: {workers} workers of pool 'a100-timeslice' "
            f"(each {{'CPU': 0.0, 'pool:a100-timeslice': 1.0}}) do not fit this local cluster, "
            f"which holds {local_cluster.workers_per_pool}") in out
    assert "RayTrainWorker" not in out and "TrainController" not in out
    assert not (tmp_path / "it-too-many").exists()


def test_mlflow_down_fails_before_any_worker(cluster_env, tmp_path, dead_mlflow):
    dead = dead_mlflow
    proc = ray_job_submit(cluster_env, *fit_args("it-no-mlflow", tmp_path,
                                                 "--set", f"mlflow.tracking_uri={dead}"),
                          timeout=300)
    assert proc.returncode != 0
    assert f"error: mlflow.tracking_uri: no MLflow server answers at {dead}" in proc.stdout
    assert "TrainController" not in proc.stdout


