"""Job estimates: how long a job of N GPU units on a pool will wait for its units and then
run, answered by the registered ``job-duration`` model (a Keras model trained with Ray Train
on the feature store's history, train/duration.py) from the pool's load right now (the online
features of view ``pool_load``, features/online.py).

The agents' platform tool ``job_estimate`` (agents/platform.py) is a thin wrapper over
:func:`estimate`. The model is loaded once per registered version and kept (TensorFlow loads
in seconds, a question should not); the alias is resolved at every call, so a promotion is
seen by the next question. The estimate names its inputs (the online values it read, the
model version), so an answer can be checked against the store and the registry.

Heavy imports (Feast, TensorFlow, MLflow) happen at the first call, never at import: the
agents app and its tools list start fast.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

from raycluster.catalog import load_catalog
from raycluster.errors import PlatformError
from raycluster.spec import SpecError, did_you_mean

#: The registered model (train.duration registers it) and the aliases tried, best first: the
#: champion a person promoted, else the candidate training registered.
MODEL_NAME = "job-duration"
ALIASES = ("champion", "candidate")
#: The online features the model reads for the pool (FeatureService job_duration_model).
POOL_LOAD = ("running_units", "pending_units", "free_units", "gpu_utilization",
             "mean_wait_1h_s")

#: The model size an estimate assumes when the question names none (the result says it).
DEFAULT_MODEL_SIZE_B = 7.0

_lock = threading.Lock()
_models: dict[tuple[str, str, str], Any] = {}  # (tracking URI, name, version) -> DurationModel
_stores: dict[str | None, Any] = {}  # feature_store.yaml path (None: the platform's) -> store


def check_request(pool: str, requested_units: int, model_size_b: float,
                  catalog_path: str | None = None) -> None:
    """SpecError (one line naming the argument) for a pool that does not exist, units it
    could never hold or a model size that is no size."""
    catalog = load_catalog(catalog_path)
    names = [p.name for p in catalog.pools]
    if pool not in names:
        raise SpecError(f"pool: unknown pool {pool!r}{did_you_mean(pool, names)}; pools: "
                        f"{', '.join(names)}", field="pool")
    found = next(p for p in catalog.pools if p.name == pool)
    if isinstance(requested_units, bool) or int(requested_units) != requested_units \
            or requested_units < 1:
        raise SpecError(f"requested_units: {requested_units!r} is not a positive whole number "
                        "of units", field="requested_units")
    if found.has_gpu:
        most = found.gpu_units_per_node * found.max_nodes
        if requested_units > most:
            raise SpecError(f"requested_units: {requested_units} is more than pool {pool!r} "
                            f"can hold ({most} units = {found.gpu_units_per_node} per node x "
                            f"{found.max_nodes} nodes)", field="requested_units")
    if not 0 < float(model_size_b) <= 10_000:
        raise SpecError(f"model_size_b: {model_size_b!r} is not a model size in billions of "
                        "parameters (0 < size <= 10000)", field="model_size_b")


def _store(path: str | None):
    from features.store import feature_store

    with _lock:
        if path not in _stores:
            _stores[path] = feature_store(path)
        return _stores[path]


def pool_load(pool: str, feature_store: str | None = None) -> dict[str, Any]:
    """The pool's online ``pool_load`` values; PlatformError when the store has none (never
    materialised) or cannot be read."""
    from features.online import pool_load_now

    try:
        values = pool_load_now(pool, store=_store(feature_store))
    except SpecError:
        raise
    except Exception as err:  # the store's own errors (PostgreSQL down, no registry)
        raise PlatformError(f"the online store cannot be read ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})"
                            ) from None
    missing = [k for k in POOL_LOAD if values.get(k) is None]
    if missing:
        raise PlatformError(f"the online store holds no pool_load for pool {pool!r} "
                            f"({', '.join(missing)} missing); run `rayplane features "
                            "materialize`")
    return {k: values[k] for k in POOL_LOAD}


def resolve_version(tracking_uri: str, name: str = MODEL_NAME) -> tuple[str, str]:
    """(alias, version) of the registered model: the first of :data:`ALIASES` it has."""
    from mlflow.exceptions import MlflowException

    from train import tracking

    tracking.check_tracking_server(tracking_uri, field="MLFLOW_TRACKING_URI")
    try:
        aliases = tracking.client(tracking_uri).get_registered_model(name).aliases or {}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PlatformError(f"{name!r} is not registered in MLflow at {tracking_uri}; "
                                "train it: `python -m train.duration --config "
                                "train/configs/duration.yaml` (docs/training.md)") from None
        raise PlatformError(f"MLflow registry: cannot read {name!r}: {err.message}") from None
    for alias in ALIASES:
        if alias in aliases:
            return alias, str(aliases[alias])
    raise PlatformError(f"{name!r} has no {' or '.join(ALIASES)} version in MLflow at "
                        f"{tracking_uri} (training registers one when it beats the baseline)")


def duration_model(tracking_uri: str, name: str = MODEL_NAME) -> tuple[Any, str, str]:
    """(model, alias, version): the registered model behind the best alias, loaded once per
    version."""
    alias, version = resolve_version(tracking_uri, name)
    key = (tracking_uri, name, version)
    with _lock:
        model = _models.get(key)
    if model is None:
        from train.duration_model import load_registered

        model = load_registered(tracking_uri, name=name, alias=alias)
        with _lock:
            _models[key] = model
    return model, alias, version


def estimate(pool: str, requested_units: int, model_size_b: float = DEFAULT_MODEL_SIZE_B, *,
             tracking_uri: str | None,
             feature_store: str | None = None, catalog_path: str | None = None
             ) -> dict[str, Any]:
    """The expected queue wait and run time of the job, with the inputs the model read."""
    check_request(pool, requested_units, model_size_b, catalog_path)
    if not tracking_uri:
        raise PlatformError("MLFLOW_TRACKING_URI is not set; the platform's MLflow URI is "
                            "printed by `rayplane up` (`eval $(rayplane env)`)")
    load = pool_load(pool, feature_store)
    model, alias, version = duration_model(tracking_uri)
    row = {"requested_units": int(requested_units), "model_size_b": float(model_size_b),
           **load, "pool": pool}
    (predicted,) = model.predict([row])
    wait, run = float(predicted["queue_wait_s"]), float(predicted["duration_s"])
    return {
        "pool": pool, "requested_units": int(requested_units),
        "model_size_b": float(model_size_b),
        "expected_wait_s": round(max(wait, 0.0), 1), "expected_duration_s": round(max(run, 0.0), 1),
        "expected_wait": human(wait), "expected_duration": human(run),
        "pool_load": load,
        "model": {"name": MODEL_NAME, "alias": alias, "version": version},
    }


# "2-unit", "2 units", "2 GPU units", "2 gpus"; "13B", "13 b", "7.5 billion"; the verbs of the
# question. The pool is found by name (the catalog's names).
_UNITS = re.compile(r"\b(\d+)\s*-?\s*(?:gpu[- ]?)?(?:units?|gpus?)\b", re.IGNORECASE)
_SIZE = re.compile(r"\b(\d+(?:\.\d+)?)\s*-?\s*(?:b|billion)\b", re.IGNORECASE)
_ASKS = re.compile(r"\b(wait|how long|queue|run time|duration|take)\b", re.IGNORECASE)


def parse_question(text: str, pools: Iterable[str]) -> dict[str, Any] | None:
    """The job a question asks about (``How long will a 2-unit job on h100-timeslice
    wait?``): ``{"pool", "requested_units", "model_size_b"}`` (pool or units None when not
    named, size left out); None when the text asks no job's wait or run time."""
    if "job" not in text.lower() or not _ASKS.search(text):
        return None
    found = [p for p in sorted(pools, key=len, reverse=True)
             if re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text, re.IGNORECASE)]
    units, size = _UNITS.search(text), _SIZE.search(text)
    asked: dict[str, Any] = {"pool": found[0] if found else None,
                             "requested_units": int(units[1]) if units else None}
    if size:
        asked["model_size_b"] = float(size[1])
    return asked


def describe(result: dict[str, Any]) -> str:
    """An estimate as one sentence (the ops graph's answer)."""
    if "error" in result:
        return f"No estimate: {result['error']}."
    load, model = result["pool_load"], result["model"]
    return (f"A {result['requested_units']}-unit job on {result['pool']} "
            f"({result['model_size_b']:g}B model) would wait about {result['expected_wait']} "
            f"and run about {result['expected_duration']} ({model['name']} version "
            f"{model['version']}, {model['alias']}; the pool now: {load['pending_units']} "
            f"units pending, {load['free_units']} free).")


def human(seconds: float) -> str:
    """``4 min``, ``1 h 20 min``, ``45 s``: a duration as a person says it."""
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    minutes = round(s / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"


__all__ = ["ALIASES", "DEFAULT_MODEL_SIZE_B", "MODEL_NAME", "POOL_LOAD", "check_request", "describe", "duration_model",
           "estimate", "human", "parse_question", "pool_load", "resolve_version"]
