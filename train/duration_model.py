"""The registered job-duration model: load it from MLflow and predict, without Ray Train.

A version of ``job-duration`` is the run's artifact folder ``model``: ``model.keras`` (Keras 3,
the normalisation inside, so it takes raw feature values) and ``features.json`` (the numeric
input columns in order, the pool vocabulary of the one-hot input, the targets). The agents'
``job_estimate`` tool and teams load it with :func:`load_registered` and call
:meth:`DurationModel.predict` on rows of raw features (Feast online values + the request).

The encoding (:func:`encode`) is the one the training loop uses, so both sides agree on
column order and pool positions by construction.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raycluster.spec import SpecError, did_you_mean

MODEL_FILE = "model.keras"
FEATURES_FILE = "features.json"
MODEL_ARTIFACT = "model"  # train.tracking.MODEL_ARTIFACT; not imported: it pulls mlflow setup
#: The model's two outputs, in seconds once decoded (trained on log1p of each).
TARGETS = ("queue_wait_s", "duration_s")
NUMERIC_INPUT, POOL_INPUT = "numeric", "pool"


@dataclass(frozen=True)
class FeatureSpec:
    """What the model's inputs are: ``features.json`` of a model folder."""

    columns: tuple[str, ...]
    pools: tuple[str, ...]
    targets: tuple[str, ...] = TARGETS

    def to_json(self) -> str:
        return json.dumps({"columns": list(self.columns), "pools": list(self.pools),
                           "targets": list(self.targets), "numeric_input": NUMERIC_INPUT,
                           "pool_input": POOL_INPUT, "target_transform": "log1p"}, indent=2)

    @classmethod
    def read(cls, folder: str | Path) -> FeatureSpec:
        data = json.loads((Path(folder) / FEATURES_FILE).read_text())
        return cls(tuple(data["columns"]), tuple(data["pools"]),
                   tuple(data.get("targets", TARGETS)))


def encode(batch: Mapping[str, Any], spec: FeatureSpec,
           field: str = "rows") -> dict[str, np.ndarray]:
    """Model inputs from columns (a dict of arrays: a Ray batch, or rows turned columnar):
    the numeric columns as float32 ``[n, len(columns)]`` and the pool one-hot ``[n, pools]``.
    An unknown pool or a missing column is a SpecError naming it (a model cannot guess)."""
    missing = [c for c in (*spec.columns, "pool") if c not in batch]
    if missing:
        raise SpecError(f"{field}: missing feature {missing[0]!r}; the model takes "
                        f"{', '.join(spec.columns)} and pool", field=f"{field}.{missing[0]}")
    numeric = np.stack([np.asarray(batch[c], dtype=np.float32) for c in spec.columns], axis=1)
    if not np.all(np.isfinite(numeric)):
        bad = spec.columns[int(np.argwhere(~np.isfinite(numeric))[0][1])]
        raise SpecError(f"{field}: feature {bad!r} is missing or not a finite number",
                        field=f"{field}.{bad}")
    index = {p: i for i, p in enumerate(spec.pools)}
    pools = [str(p) for p in np.asarray(batch["pool"]).tolist()]
    onehot = np.zeros((len(pools), len(spec.pools)), dtype=np.float32)
    for row, pool in enumerate(pools):
        if pool not in index:
            raise SpecError(f"{field}.pool: {pool!r} is not a pool the model knows"
                            f"{did_you_mean(pool, spec.pools)}; known: "
                            f"{', '.join(spec.pools)}", field=f"{field}.pool")
        onehot[row, index[pool]] = 1.0
    return {NUMERIC_INPUT: numeric, POOL_INPUT: onehot}


def encode_targets(batch: Mapping[str, Any], spec: FeatureSpec) -> np.ndarray:
    """log1p of the targets, ``[n, 2]``: waits and durations span orders of magnitude, and a
    squared error in log space weighs a 10 s miss on a 20 s wait like 10 min on 20 min."""
    return np.stack([np.log1p(np.clip(np.asarray(batch[t], dtype=np.float64), 0, None))
                     for t in spec.targets], axis=1).astype(np.float32)


def decode(outputs: Any, spec: FeatureSpec) -> np.ndarray:
    """Seconds ``[n, 2]`` from the model's log1p outputs (a dict by target, or an array)."""
    if isinstance(outputs, Mapping):
        arr = np.concatenate([np.asarray(outputs[t]).reshape(-1, 1) for t in spec.targets], 1)
    else:
        arr = np.asarray(outputs).reshape(-1, len(spec.targets))
    # A log-space output below 0 would be a negative time.
    return np.expm1(np.clip(arr.astype(np.float64), 0.0, math.log(1e8)))


def columnar(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    keys = {k for row in rows for k in row}
    return {k: [row.get(k, math.nan) for row in rows] for k in keys}


class DurationModel:
    """A loaded job-duration model: ``predict(rows)`` -> seconds per row."""

    def __init__(self, model, spec: FeatureSpec, version: str | None = None,
                 source: str | None = None):
        self.model = model
        self.spec = spec
        self.version = version
        self.source = source

    @classmethod
    def from_folder(cls, folder: str | Path, **kw: Any) -> DurationModel:
        import keras  # Keras 3 (TF backend); tf.keras would follow TF_USE_LEGACY_KERAS

        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file() or not (folder / FEATURES_FILE).is_file():
            raise SpecError(f"model: {folder} lacks {MODEL_FILE} or {FEATURES_FILE} (what "
                            "train.duration logs)", field="model")
        return cls(keras.saving.load_model(folder / MODEL_FILE, compile=False),
                   FeatureSpec.read(folder), **kw)

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        """``[{queue_wait_s, duration_s}]`` in seconds for rows carrying the model's feature
        columns and ``pool``."""
        if not rows:
            return []
        inputs = encode(columnar(rows), self.spec)
        seconds = decode(self.model.predict_on_batch(inputs), self.spec)
        return [{t: float(v) for t, v in zip(self.spec.targets, row, strict=True)}
                for row in seconds]


def load_registered(tracking_uri: str, name: str = "job-duration",
                    alias: str = "candidate") -> DurationModel:
    """The version of registered model ``name`` that ``alias`` points at, downloaded through
    MLflow's client (the server's artifact proxy) and loaded."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = c.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise SpecError(f"model: no version of {name!r} has alias {alias!r} at {tracking_uri} "
                        f"({err.error_code}); train one with `python -m train.duration`",
                        field="model") from None
    tmp = tempfile.mkdtemp(prefix="rayplane-duration-")
    folder = c.download_artifacts(version.run_id, MODEL_ARTIFACT, tmp)
    return DurationModel.from_folder(folder, version=str(version.version),
                                     source=f"models:/{name}@{alias}")


__all__ = ["FEATURES_FILE", "MODEL_FILE", "TARGETS", "DurationModel", "FeatureSpec",
           "columnar", "decode", "encode", "encode_targets", "load_registered"]
