"""MLflow: one tracking run per training run, the model folder as its artifact, the registry.

The driver of ``train.fit`` owns the MLflow run: it checks the server answers before any
worker starts, creates the run (or finds the one a previous submission of the same run name
left, and continues it), rank 0 of the workers logs per-step metrics into it, and the driver
logs the evaluation, the model folder (artifact ``model``) and registers
``runs:/<run_id>/model`` as a new version with alias ``candidate`` when the gate passes.

A tracking server that goes down during a run loses nothing: rank 0's ``train.sink.MetricsSink``
keeps what it could not send (and writes it into every checkpoint, so a restarted worker
group or the driver still has it), and the driver waits up to ``mlflow.wait_s`` for the
server to come back before logging the evaluation and the model (:func:`when_up`); past
that the run fails with one line (:class:`TrackingUnavailable`), never hangs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from raycluster.spec import SpecError

RUN_NAME_TAG = "rayplane.run_name"
STORAGE_TAG = "rayplane.storage_path"
KIND_TAG = "rayplane.kind"
PARENT_TAG = "mlflow.parentRunId"
CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_ARTIFACT = "model"
#: Rank 0's metrics not yet in MLflow, in a checkpoint folder (a JSON list of metrics).
PENDING_METRICS = "pending_metrics.json"
T = TypeVar("T")

# The MLflow client retries a dead server for minutes by default; a user waiting on a
# submission should hear within seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_tracking_server(uri: str | None, field: str = "mlflow.tracking_uri",
                          timeout: float = 5.0) -> str:
    """The URI, once its server answers ``/health``; else a one-line SpecError naming the
    field and the URI."""
    if not uri:
        where = field if field.startswith("--") else f"{field} in the config"
        raise SpecError(f"{field}: not set; set MLFLOW_TRACKING_URI (the local platform's is "
                        f"printed by `rayplane up`) or {where}", field=field)
    if not uri.startswith(("http://", "https://")):
        return uri  # a file or database store: nothing to reach
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise SpecError(f"{field}: MLflow server at {uri} answered {resp.status} on "
                                "/health", field=field)
    except urllib.error.HTTPError as err:
        raise SpecError(f"{field}: MLflow server at {uri} answered {err.code} on /health",
                        field=field) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SpecError(f"{field}: no MLflow server answers at {uri} ({reason}); start it "
                        "(`rayplane up`) or point MLFLOW_TRACKING_URI at a running one",
                        field=field) from None
    return uri


class TrackingUnavailable(RuntimeError):
    """The MLflow server went down during a run and did not come back in time (one line)."""


def server_up(uri: str | None, timeout: float = 2.0) -> bool:
    """Whether the tracking server answers ``/health`` now (a non-HTTP store: always)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_for_server(uri: str, wait_s: float, what: str,
                    log: Callable[[str], object] = print) -> float:
    """Return once the server answers (the seconds waited); one line when it does not yet,
    :class:`TrackingUnavailable` after ``wait_s``."""
    if server_up(uri):
        return 0.0
    started = time.monotonic()
    log(f"MLflow at {uri} is not answering; waiting up to {wait_s:.0f}s (mlflow.wait_s) "
        f"to {what}")
    while (left := wait_s - (time.monotonic() - started)) > 0:
        time.sleep(min(2.0, max(0.1, left)))
        if server_up(uri):
            waited = time.monotonic() - started
            log(f"MLflow at {uri} is back after {waited:.0f}s")
            return waited
    raise TrackingUnavailable(
        f"mlflow.tracking_uri: the MLflow server at {uri} went down and did not come back "
        f"within {wait_s:.0f}s (mlflow.wait_s), so this run could not {what}")


def when_up(uri: str, wait_s: float, what: str, call: Callable[[], T],
            log: Callable[[str], object] = print) -> T:
    """``call()``; when it fails because the server is down, wait for it (:func:
    `wait_for_server`) and call again. An error from a server that answers is raised as
    it is. ``call`` must be safe to repeat (metrics carry their own timestamps)."""
    for _ in range(5):
        wait_for_server(uri, wait_s, what, log)
        try:
            return call()
        except Exception:
            if server_up(uri):
                raise
    return call()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass
class TrackedRun:
    run_id: str
    experiment_id: str
    resumed: bool


def start_run(uri: str, experiment: str, run_name: str, storage_path: str,
              params: dict[str, Any], kind: str = "train",
              parent_run_id: str | None = None) -> TrackedRun:
    """The MLflow run of training run ``run_name``: the unfinished one of an earlier
    submission (same name and storage) when there is one, else a new run."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    found = c.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and "
                      f"tags.`{KIND_TAG}` = '{kind}'",
        order_by=["attributes.start_time DESC"], max_results=20)
    for run in found:
        if run.data.tags.get(STORAGE_TAG) == storage_path:
            c.update_run(run.info.run_id, status="RUNNING")
            return TrackedRun(run.info.run_id, exp_id, True)
    tags = {RUN_NAME_TAG: run_name, STORAGE_TAG: storage_path, KIND_TAG: kind}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    log_params(c, run.info.run_id, params)
    return TrackedRun(run.info.run_id, exp_id, False)


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, "" if v is None else str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 90):  # the batch API takes at most 100 params
        c.log_batch(run_id, params=items[i:i + 90])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None,
                timestamp_ms: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step or 0)
                                           for k, v in metrics.items()])


def log_metric_dicts(uri: str, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Log metrics kept as dicts (:meth:`train.sink.MetricsSink.pending_rows`), in batches."""
    from mlflow.entities import Metric

    metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
               for r in rows]
    for i in range(0, len(metrics), 900):  # MLflow's batch limit is 1000
        client(uri).log_batch(run_id, metrics=metrics[i:i + 900])


def read_pending(folder: str | Path) -> list[dict[str, Any]]:
    """The metrics rank 0 had not sent when it wrote this checkpoint folder
    (``train.sink.MetricsSink.write_pending``)."""
    path = Path(folder) / PENDING_METRICS
    return json.loads(path.read_text()) if path.is_file() else []


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def log_model_folder(uri: str, run_id: str, folder: str | Path,
                     files: tuple[str, ...] | None = None) -> None:
    """Log the model folder as the run's artifact ``model`` (only ``files`` when given)."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="rayplane-model-") as tmp:
        for path in folder.iterdir():
            if path.is_file() and (files is None or path.name in files):
                shutil.copy2(path, Path(tmp) / path.name)
        client(uri).log_artifacts(run_id, tmp, artifact_path=MODEL_ARTIFACT)


def log_json(uri: str, run_id: str, name: str, data: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="rayplane-json-") as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, default=str))
        client(uri).log_artifact(run_id, str(path))


# -- the registry -------------------------------------------------------------------------


def register(uri: str, name: str, run_id: str, tags: dict[str, Any] | None = None,
             alias: str = CANDIDATE) -> str:
    """Register ``runs:/<run_id>/model`` as a new version of ``name`` and point ``alias`` at
    it. Returns the version. The folder is plain Hugging Face files (docs/model-format.md),
    so the version's source is the run URI itself."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.create_registered_model(name, description="rayplane's tool-use model "
                                                    "(docs/model-format.md)")
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = c.create_model_version(
        name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()})
    c.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def register_run(uri: str, name: str, run_id: str) -> str:
    """:func:`register` a run that a user names (``rayplane models register``, a sweep's
    best): refused with a SpecError naming ``run_id`` when it is no run of this server or has
    no model folder."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_run(run_id)
    except MlflowException:
        raise SpecError(f"run_id: {run_id!r} is not an MLflow run at {uri}",
                        field="run_id") from None
    files = [a.path for a in c.list_artifacts(run_id, MODEL_ARTIFACT)]
    if not any(p.endswith("config.json") for p in files):
        raise SpecError(f"run_id: run {run_id} has no '{MODEL_ARTIFACT}' artifact with a "
                        "config.json (train.fit and train.tune log one)", field="run_id")
    return register(uri, name, run_id)


def _model_exists(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            names = [m.name for m in c.search_registered_models(max_results=100)]
            from raycluster.spec import did_you_mean

            raise SpecError(f"model: {name!r} is not a registered model{did_you_mean(name, names)}"
                            f"; registered: {', '.join(names) or 'none'}", field="model") from None
        raise


def promote(uri: str, name: str, version: str, alias: str = CHAMPION) -> str | None:
    """Point ``alias`` (champion) at ``version``; returns the version it pointed at before."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    _model_exists(c, name)
    try:
        c.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            versions = sorted((v.version for v in c.search_model_versions(f"name = '{name}'")),
                              key=int)
            raise SpecError(f"version: {version!r} is not a version of {name!r}; versions: "
                            f"{', '.join(versions) or 'none'}", field="version") from None
        raise
    previous = None
    try:
        previous = c.get_model_version_by_alias(name, alias).version
    except MlflowException:
        pass
    c.set_registered_model_alias(name, alias, str(version))
    return previous


def list_models(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Registered models and their versions: aliases, run, eval metrics (version tags)."""
    c = client(uri)
    if name:
        _model_exists(c, name)
        models = [c.get_registered_model(name)]
    else:
        models = c.search_registered_models(max_results=200)
    rows = []
    for m in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in (m.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(c.search_model_versions(f"name = '{m.name}'"),
                        key=lambda v: int(v.version)):
            rows.append({"model": m.name, "version": str(v.version),
                         "aliases": sorted(aliases.get(str(v.version), [])),
                         "run_id": v.run_id, "source": v.source,
                         "exact_match": v.tags.get("eval_exact_match"),
                         "created": v.creation_timestamp})
    return rows


def result_line(text: str, prefix: str) -> dict[str, Any] | None:
    """The JSON a job printed after ``prefix`` on its last such line (train.fit's and
    train.duration's outcome, for scripts and tests reading job logs)."""
    for line in reversed(text.splitlines()):
        if prefix in line:
            return json.loads(line.split(prefix, 1)[1])
    return None
