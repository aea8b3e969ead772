"""The spec of a Keras job-duration run (``python -m train.duration --config FILE``).

It carries the same run fields as ``TrainConfig`` (name, pool, num_workers, storage_path,
keep_checkpoints, max_failures, local, mlflow), so the platform's checks and Ray objects
(``check_pool_capacity``, ``connect``, ``scaling_config``, ``run_config``) take it as they
are: a pool is still typed once, in the catalog. What differs is the model and the data: a
small Keras regressor, trained for ``epochs`` on the point-in-time-correct rows Feast joins
(``features.training.training_dataset``), registered when it beats the mean baseline.
"""

from __future__ import annotations

from datetime import datetime
from typing import Self

from pydantic import Field, field_validator, model_validator

from raycluster.spec import Spec
from train.config import (
    MLflowSpec,
    RunConfigFile,
    check_run_name,
    check_storage_path,
    default_storage_path,
)


class DurationMLflowSpec(MLflowSpec):
    """MLflow as for ``train.fit``, with this model's experiment and registered name."""

    experiment: str = Field(default="rayplane-job-duration", description="MLflow experiment.")
    registered_model: str = Field(default="job-duration",
                                  description="Registered model a passing run becomes a "
                                              "version of (alias 'candidate').")


class FeatureDataSpec(Spec):
    """Which labelled jobs the run trains on (the Feast point-in-time join)."""

    feature_store: str | None = Field(
        default=None, description="feature_store.yaml of the Feast repo (default: "
                                  "RAYPLANE_FEATURE_STORE, else the platform's).")
    start: datetime | None = Field(default=None,
                                   description="Earliest job submission (ISO 8601) trained on.")
    end: datetime | None = Field(default=None,
                                 description="Latest job submission (ISO 8601) trained on.")
    validation_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0,
        description="The newest jobs by submission time held out for validation: the model "
                    "is judged on jobs that came after every job it learnt from.")
    min_rows: int = Field(default=200, ge=10,
                          description="Fewest labelled jobs a run accepts.")

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.start and self.end and self.start >= self.end:
            raise ValueError(f"end: {self.end.isoformat()} is not after start "
                             f"({self.start.isoformat()})")
        return self


class DurationConfig(RunConfigFile):
    """One Keras run predicting a job's queue wait and duration from its features."""

    spec_kind = "duration training config"

    name: str = Field(description="Run name: the Ray Train run and the MLflow run. "
                                  "Re-submitting the same name continues the run.")
    pool: str = Field(default="a100-timeslice", description="Catalog pool the workers run on.")
    num_workers: int = Field(default=2, ge=1,
                             description="Ray Train workers (MultiWorkerMirroredStrategy "
                                         "replicas).")
    epochs: int = Field(default=30, ge=1, description="Passes over the training rows.")
    batch_size: int = Field(default=64, ge=1, description="Rows per step per worker.")
    lr: float = Field(default=3e-3, gt=0, le=1.0, description="Adam learning rate.")
    hidden: list[int] = Field(default_factory=lambda: [64, 32], min_length=1,
                              description="Units of the hidden Dense layers (ReLU).")
    min_improvement: float = Field(
        default=0.2, ge=0.0, lt=1.0,
        description="Gate: the model's validation MAE must be at least this fraction below "
                    "the mean baseline's, on both targets, to be registered.")
    data: FeatureDataSpec = Field(default_factory=FeatureDataSpec,
                                  description="The labelled jobs (Feast).")
    keep_checkpoints: int = Field(default=2, ge=1,
                                  description="Checkpoints kept, the best by val loss.")
    max_failures: int = Field(default=3, ge=-1,
                              description="Worker failures to recover from (-1: always).")
    storage_path: str = Field(default_factory=default_storage_path,
                              description="Where checkpoints live: an absolute path or a URI.")
    mlflow: DurationMLflowSpec = Field(default_factory=DurationMLflowSpec,
                                       description="Tracking + registry.")
    threads_per_worker: int = Field(default=1, ge=1,
                                    description="TensorFlow intra/inter-op threads per worker.")
    local: bool | None = Field(default=None,
                               description="Run as on the local platform (pools emulated). "
                                           "Default: detected from the cluster.")
    seed: int = Field(default=0, description="Seed of weight init and batch order.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_run_name(v)

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: list[int]) -> list[int]:
        bad = [u for u in v if not 1 <= u <= 4096]
        if bad:
            raise ValueError(f"layer sizes must be 1..4096, got {bad[0]}")
        return v

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str) -> str:
        return check_storage_path(v)
