"""``python -m train.duration --config FILE``: a Keras model of job wait and duration.

What a team submits: ``ray job submit --working-dir . -- python -m train.duration --config
train/configs/duration.yaml``. The driver validates the run before any worker starts (one
line, exit 2: a config field, a pool the run does not fit, MLflow or the feature store
missing), reads the labelled jobs point-in-time-correct from Feast
(``features.training.training_dataset``, a Ray Dataset), holds the newest jobs out for
validation, runs a Ray Train ``TensorflowTrainer`` (``MultiWorkerMirroredStrategy``, the
loop in train/keras_loop.py) on the config's pool, logs the model to MLflow and registers it
(alias ``candidate``) when it beats the mean baseline by ``min_improvement`` on both targets.
Re-submitting the same run name continues from its last checkpoint.

Exit codes: 0 trained and registered (or --no-register), 1 training failed or the model
missed the gate, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raycluster.spec import SpecError
from train import tracking
from train.config import check_pool_capacity, platform_catalog, scaling_config
from train.duration_model import FEATURES_FILE, MODEL_FILE, TARGETS, FeatureSpec
from train.keras_config import DurationConfig
from train.platform import Placement, connect, run_config

RESULT_PREFIX = "RAYPLANE_DURATION_RESULT "
KIND = "duration"
#: The run's artifact holding the rows read from Feast (train and validation).
TRAINING_DATA = "training_data.parquet"


@dataclass
class DurationOutcome:
    name: str
    mlflow_run_id: str
    epochs: int
    train_rows: int
    validation_rows: int
    metrics: dict[str, float]
    restarts: int
    resubmissions: int
    resumed_from_epoch: int | None
    checkpoint: str | None
    passed: bool
    registered_model: str | None
    version: str | None
    train_seconds: float


@dataclass
class Splits:
    """The labelled jobs split by time, and what the driver derives from the train part."""

    train: Any  # ray.data.Dataset
    validation: Any
    train_rows: int
    validation_rows: int
    cutoff: str
    mean: list[float]
    variance: list[float]
    baseline: dict[str, float]


def feature_spec() -> FeatureSpec:
    from features.repo import POOLS
    from features.training import FEATURE_COLUMNS

    return FeatureSpec(tuple(FEATURE_COLUMNS), tuple(POOLS))


def split_by_time(frame, fraction: float):
    """(train, validation): the newest ``fraction`` of the jobs by submission time held out,
    ties broken by job id so a split is the same on every run. Validating on jobs that came
    after every training job is what the model faces in use; a random split would let it
    peek at pool load from the validation jobs' own hours."""
    frame = frame.sort_values(["event_timestamp", "job_id"], kind="stable").reset_index(
        drop=True)
    cut = len(frame) - max(1, math.ceil(fraction * len(frame)))
    return frame.iloc[:cut], frame.iloc[cut:]


def prepare(frame, cfg: DurationConfig, spec: FeatureSpec) -> Splits:
    """Split ``frame`` (the joined rows) and compute the normalisation and the baseline on
    the train part only."""
    import numpy as np
    import ray

    missing = [c for c in (*spec.columns, "pool", *spec.targets, "job_id", "event_timestamp")
               if c not in frame.columns]
    if missing:
        raise SpecError(f"data: the training rows lack column {missing[0]!r} "
                        "(features.training.training_dataset)", field="data")
    frame = frame.dropna(subset=[*spec.columns, *spec.targets])
    if len(frame) < cfg.data.min_rows:
        window = f"{cfg.data.start or 'the start'} .. {cfg.data.end or 'now'}"
        raise SpecError(f"data: {len(frame)} labelled jobs in {window}, fewer than "
                        f"data.min_rows "
                        f"({cfg.data.min_rows}); materialise more history or widen "
                        "data.start/data.end", field="data")
    train, val = split_by_time(frame, cfg.data.validation_fraction)
    numeric = train[list(spec.columns)].to_numpy(dtype=np.float64)
    keep = [*spec.columns, "pool", *spec.targets]
    return Splits(
        train=ray.data.from_pandas(train[keep].reset_index(drop=True)),
        validation=ray.data.from_pandas(val[keep].reset_index(drop=True)),
        train_rows=len(train), validation_rows=len(val),
        cutoff=str(val["event_timestamp"].iloc[0]),
        mean=numeric.mean(axis=0).tolist(),
        # A constant column would divide by zero in Normalization: floor its variance.
        variance=np.maximum(numeric.var(axis=0), 1e-6).tolist(),
        baseline={f"train_mean_{t}": float(train[t].mean()) for t in spec.targets})


def load_frame(cfg: DurationConfig):
    """The labelled jobs as pandas: the Feast point-in-time join, run on Ray."""
    from features.store import feature_store
    from features.training import training_dataset

    store = feature_store(cfg.data.feature_store)
    ds = training_dataset(store, start=cfg.data.start, end=cfg.data.end)
    return ds.to_pandas()


def trainer(cfg: DurationConfig, placement: Placement, splits: Splits, loop_config: dict):
    """A ``TensorflowTrainer`` on the config's pool with the platform's run defaults; only
    the training rows are split across workers (rank 0 validates on all of them)."""
    from ray.train import DataConfig
    from ray.train.tensorflow import TensorflowTrainer

    from train.keras_loop import train_loop_per_worker

    return TensorflowTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=scaling_config(placement.catalog, cfg, placement.local),
        run_config=run_config(cfg),
        datasets={"train": splits.train, "validation": splits.validation},
        dataset_config=DataConfig(datasets_to_split=["train"]))


def read_state(checkpoint) -> dict[str, Any]:
    from train.keras_loop import STATE_FILE

    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / STATE_FILE).read_text())


def passed_gate(metrics: dict[str, float], cfg: DurationConfig) -> bool:
    return all(metrics.get(f"improvement_{t}", -1.0) >= cfg.min_improvement for t in TARGETS)


def gate_summary(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{t} MAE {metrics[f'val_mae_{t}']:.0f}s vs mean baseline "
        f"{metrics[f'baseline_mae_{t}']:.0f}s ({metrics[f'improvement_{t}']:+.1%})"
        for t in TARGETS)


def log_training_data(uri: str, run_id: str, frame) -> None:
    """The point-in-time rows the model is trained and validated on, as the run's artifact
    TRAINING_DATA: what a reviewer checks the features against (lineage), and what the
    point-in-time test reads."""
    with tempfile.TemporaryDirectory(prefix="rayplane-data-") as tmp:
        path = Path(tmp) / TRAINING_DATA
        frame.to_parquet(path, index=False)
        tracking.client(uri).log_artifact(run_id, str(path))


def train(cfg: DurationConfig, placement: Placement, splits: Splits, spec: FeatureSpec, *,
          register: bool = True, log=print, frame=None) -> DurationOutcome:
    """Train on ``placement``, log to MLflow (``frame``, the rows read from Feast, too) and
    register when the gate passes."""
    uri = cfg.mlflow.tracking_uri or ""
    run = tracking.start_run(uri, cfg.mlflow.experiment, cfg.name, cfg.storage_path,
                             cfg.flat_params(), kind=KIND)
    log(f"MLflow run {run.run_id} ({'continued' if run.resumed else 'new'}) in experiment "
        f"{cfg.mlflow.experiment!r} at {uri}")
    tracking.set_tags(uri, run.run_id, {"pool": cfg.pool, "local": placement.local,
                                        "num_workers": cfg.num_workers,
                                        "validation_from": splits.cutoff})
    tracking.log_metrics(uri, run.run_id, {"train_rows": splits.train_rows,
                                           "validation_rows": splits.validation_rows})
    if frame is not None:
        log_training_data(uri, run.run_id, frame)
    loop_config = {"cfg": cfg.to_dict(), "spec": {"columns": spec.columns, "pools": spec.pools},
                   "mean": splits.mean, "variance": splits.variance,
                   "baseline": splits.baseline, "submission": uuid.uuid4().hex,
                   "tracking_uri": cfg.mlflow.tracking_uri, "mlflow_run_id": run.run_id}
    started = time.perf_counter()
    try:
        result = trainer(cfg, placement, splits, loop_config).fit()
    except BaseException:
        with contextlib.suppress(Exception):  # the training error is the one to see
            tracking.end_run(uri, run.run_id, "FAILED")
        raise
    train_seconds = time.perf_counter() - started
    # The newest checkpoint holds the last epoch's model and metrics (also when a finished
    # run is submitted again and trains nothing).
    state = read_state(result.checkpoint)
    metrics = {k: float(v) for k, v in state.items()
               if k.startswith(("val_", "baseline_", "improvement_"))}
    log(f"trained {cfg.name} to epoch {state['epoch']} in {train_seconds:.0f}s (restarts "
        f"{state.get('restarts', 0)}, resubmissions {state.get('resubmissions', 0)})")
    passed = passed_gate(metrics, cfg)
    log(gate_summary(metrics))
    with result.checkpoint.as_directory() as folder:
        unsent = tracking.read_pending(folder)
        if unsent:
            tracking.log_metric_dicts(uri, run.run_id, unsent)
        tracking.log_model_folder(uri, run.run_id, folder, (MODEL_FILE, FEATURES_FILE))
    tracking.log_metrics(uri, run.run_id, {**metrics, "train_seconds": train_seconds,
                                           "restarts": float(state.get("restarts", 0))},
                         step=int(state["epoch"]))
    tracking.set_tags(uri, run.run_id, {"gate_passed": passed,
                                        "checkpoint": result.checkpoint.path})
    version = None
    if passed and register:
        version = register_model(uri, cfg, run.run_id, metrics)
        log(f"registered {cfg.mlflow.registered_model} version {version} (alias "
            f"{tracking.CANDIDATE}): beats the mean baseline by >= {cfg.min_improvement:.0%} "
            "on both targets")
    elif not passed:
        log(f"not registered: the model does not beat the mean baseline by "
            f"{cfg.min_improvement:.0%} (min_improvement) on both targets")
    tracking.end_run(uri, run.run_id, "FINISHED")
    resumed = state.get("resumed_from_epoch")
    return DurationOutcome(
        name=cfg.name, mlflow_run_id=run.run_id, epochs=int(state["epoch"]),
        train_rows=splits.train_rows, validation_rows=splits.validation_rows, metrics=metrics,
        restarts=int(state.get("restarts", 0)), resubmissions=int(state.get("resubmissions", 0)),
        resumed_from_epoch=None if resumed is None else int(resumed),
        checkpoint=result.checkpoint.path, passed=passed,
        registered_model=cfg.mlflow.registered_model if version else None, version=version,
        train_seconds=train_seconds)


def register_model(uri: str, cfg: DurationConfig, run_id: str,
                   metrics: dict[str, float]) -> str:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # exists already: tracking.register goes on
        tracking.client(uri).create_registered_model(
            cfg.mlflow.registered_model,
            description="Expected queue wait and duration of a job (Keras, train.duration; "
                        "train/duration_model.py loads it)")
    return tracking.register(uri, cfg.mlflow.registered_model, run_id, {
        **{f"val_mae_{t}": round(metrics[f"val_mae_{t}"], 1) for t in TARGETS},
        **{f"baseline_mae_{t}": round(metrics[f"baseline_mae_{t}"], 1) for t in TARGETS},
        "run_name": cfg.name, "pool": cfg.pool, "epochs": cfg.epochs})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.duration",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="Duration training config (YAML).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="Override a field: epochs=5, data.end=...")
    parser.add_argument("--no-register", action="store_true",
                        help="Train and log but do not register, whatever the gate says.")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> DurationConfig:
    """The config, the pool capacity, MLflow and the feature store config, before Ray."""
    from features.store import config_path

    cfg = DurationConfig.load(args.config, args.overrides)
    check_pool_capacity(platform_catalog(), cfg)
    tracking.check_tracking_server(cfg.mlflow.tracking_uri)
    # Absolute: connecting may leave the working directory (raycluster.rayjob.settle_working_dir).
    cfg.data.feature_store = str(config_path(cfg.data.feature_store).resolve())
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = validate(args)
        placement = connect(cfg, platform_catalog())
        spec = feature_spec()
        started = time.perf_counter()
        frame = load_frame(cfg)
        splits = prepare(frame, cfg, spec)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"run {cfg.name}: pool {cfg.pool} x{cfg.num_workers} "
          f"({'local platform' if placement.local else 'cluster'}), {cfg.epochs} epochs; "
          f"{splits.train_rows} training jobs, {splits.validation_rows} validation jobs "
          f"(submitted from {splits.cutoff}), read from Feast in "
          f"{time.perf_counter() - started:.1f}s", flush=True)
    outcome = train(cfg, placement, splits, spec, register=not args.no_register,
                    log=lambda msg: print(msg, flush=True), frame=frame)
    print(RESULT_PREFIX + json.dumps(asdict(outcome)), flush=True)
    return 0 if outcome.passed else 1


def result_from_logs(text: str) -> dict[str, Any] | None:
    """The outcome a ``train.duration`` job printed (for scripts and tests reading job logs)."""
    return tracking.result_line(text, RESULT_PREFIX)


if __name__ == "__main__":
    sys.exit(main())
