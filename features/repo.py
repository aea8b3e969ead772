"""The feature repository: what the platform records about its jobs and pools.

Two entities -- a ``job`` (join key ``job_id``) and a ``pool`` (join key ``pool``, a catalog
pool name) -- and three feature views over the parquet files ``features.data`` writes:

- ``job_request``: what a job asked for at submission (units, model size, pool);
- ``job_outcome``: what happened (queue wait, duration, GPU utilisation). Outcomes are labels,
  never model inputs: their timestamp is when the job *ended* (the row's ``created``), so a
  point-in-time join never hands a model an outcome that was not known yet;
- ``pool_load``: the pools' 10-minute snapshots. Its TTL (1 h) bounds how stale a snapshot
  the online store serves; a pool whose snapshots stop for an hour has no load.

The feature service ``job_duration_model`` is what the job-duration model (train.duration)
reads: the request's units and model size plus the pool's load when the job was submitted.

The repository is declared here as plain data (``ENTITIES``, ``VIEWS``, ``SERVICES``) and
:func:`feature_objects` builds the Feast objects from it: the CLI checks a view name or an
entity key against the declaration without importing Feast, so bad input is refused at once.
A team adds a view with a ``ViewSpec`` in ``VIEWS`` (docs/features.md), then runs
``rayplane features apply`` and ``rayplane features materialize --views NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from features.data import JOBS_FILE, POOL_LOAD_FILE
from raycluster.catalog import load_catalog

#: The catalog's pools, the values the ``pool`` entity takes.
POOLS: tuple[str, ...] = tuple(p.name for p in load_catalog().pools)

JOB_REQUEST = "job_request"
JOB_OUTCOME = "job_outcome"
POOL_LOAD = "pool_load"
FEATURE_SERVICE = "job_duration_model"

#: Pool snapshots older than this are not served (six missed snapshots).
POOL_LOAD_TTL = timedelta(hours=1)
#: A job's request and outcome stay servable for a month (jobs run for at most two days).
JOB_TTL = timedelta(days=30)


@dataclass(frozen=True)
class EntitySpec:
    name: str
    join_key: str
    dtype: str  # "Int64" or "String"
    description: str


@dataclass(frozen=True)
class ViewSpec:
    """A feature view over one parquet file of the data folder."""

    name: str
    entity: str
    file: str
    source: str  # the Feast data source's name (one per file and timestamp field)
    timestamp_field: str
    features: tuple[tuple[str, str], ...]  # (name, "Int64" | "Float64" | "String")
    ttl: timedelta
    description: str
    created_column: str = ""


ENTITIES: dict[str, EntitySpec] = {e.name: e for e in (
    EntitySpec("job", "job_id", "Int64", "One job submitted to the platform."),
    EntitySpec("pool", "pool", "String", "A node pool of the catalog (raycluster/data/pools.yaml)."),
)}
VIEWS: dict[str, ViewSpec] = {v.name: v for v in (
    ViewSpec(JOB_REQUEST, "job", JOBS_FILE, "jobs", "submitted_at",
             (("requested_units", "Int64"), ("model_size_b", "Float64"), ("pool", "String")),
             JOB_TTL, "What a job asked for at submission.", created_column="created"),
    # Same file, timestamped at the end of each job: the outcome exists from then on.
    ViewSpec(JOB_OUTCOME, "job", JOBS_FILE, "job_outcomes", "created",
             (("queue_wait_s", "Float64"), ("duration_s", "Float64"),
              ("gpu_utilization", "Float64")),
             JOB_TTL, "What happened to a job (labels, never model inputs)."),
    ViewSpec(POOL_LOAD, "pool", POOL_LOAD_FILE, "pool_load", "event_timestamp",
             (("running_units", "Int64"), ("pending_units", "Int64"), ("free_units", "Int64"),
              ("gpu_utilization", "Float64"), ("mean_wait_1h_s", "Float64")),
             POOL_LOAD_TTL, "A pool's load at a snapshot (every 10 minutes).",
             created_column="created"),
)}
#: Feature services: name -> (view, its features or None for all of them) in order.
SERVICES: dict[str, tuple[tuple[str, tuple[str, ...] | None], ...]] = {
    FEATURE_SERVICE: ((JOB_REQUEST, ("requested_units", "model_size_b")), (POOL_LOAD, None)),
}
FEATURE_VIEWS = tuple(VIEWS)
#: Entity join keys and their types (what ``rayplane features get`` checks).
ENTITY_KEYS: dict[str, str] = {e.join_key: e.dtype for e in ENTITIES.values()}


def feature_objects(data_uri: str) -> list:
    """Every Feast object of the repository (entities, views, services), the views reading
    the parquet files under ``data_uri`` (a folder or an ``s3://`` prefix)."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64, String

    types = {"Int64": Int64, "Float64": Float64, "String": String}
    value_types = {"Int64": ValueType.INT64, "String": ValueType.STRING}
    entities = {e.name: Entity(name=e.name, join_keys=[e.join_key],
                               value_type=value_types[e.dtype], description=e.description)
                for e in ENTITIES.values()}
    views = {}
    for v in VIEWS.values():
        source = FileSource(name=v.source, path=f"{data_uri.rstrip('/')}/{v.file}",
                            timestamp_field=v.timestamp_field,
                            created_timestamp_column=v.created_column)
        views[v.name] = FeatureView(
            name=v.name, entities=[entities[v.entity]], ttl=v.ttl, source=source,
            schema=[Field(name=n, dtype=types[t]) for n, t in v.features],
            description=v.description)
    services = [FeatureService(name=name, features=[views[v][list(f)] if f else views[v]
                                                    for v, f in parts])
                for name, parts in SERVICES.items()]
    return [*entities.values(), *views.values(), *services]


__all__ = ["ENTITIES", "ENTITY_KEYS", "FEATURE_SERVICE", "FEATURE_VIEWS", "JOB_OUTCOME",
           "JOB_REQUEST", "JOB_TTL", "POOLS", "POOL_LOAD", "POOL_LOAD_TTL", "SERVICES",
           "VIEWS", "EntitySpec", "ViewSpec", "feature_objects"]
