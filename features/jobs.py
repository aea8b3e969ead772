"""The Ray-job entrypoint of the feature store: ``python -m features.jobs COMMAND``.

``rayplane features apply|materialize`` submit it to the cpu pool (entrypoint resources
``pool:cpu``); on EKS the materialisation RayCronJob runs ``materialize``. Commands:

- ``apply``: write the platform's history (features.data, ending now) when the data folder
  holds none or only history older than the pool_load TTL (local data; on S3 only when
  missing), then ``FeatureStore.apply`` of the repository (features.repo);
- ``materialize [--views v1,v2] [--end ISO]``: Feast's incremental materialisation on the Ray
  compute engine into the online store (PostgreSQL), then a read-back of the newest rows of
  each view: Feast's Ray engine logs a failed online write and goes on (its
  ``safe_batch_processor``), so the job itself checks that the rows arrived;
- ``dataset --out FILE [--entities FILE]``: the point-in-time training data
  (features.training), or the feature service joined to the entity rows in a parquet file,
  written to FILE (what the tests inspect).

The last line of a successful command is ``RAYPLANE_FEATURES {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from features import data as history
from features.online import names, view_names
from features.repo import POOL_LOAD_TTL, feature_objects
from features.store import connect_ray, data_uri, feature_store
from raycluster.errors import RayplaneError
from raycluster.spec import SpecError, did_you_mean

#: Entity keys read back per view after materialising.
READ_BACK = 8


def _now() -> datetime:
    return datetime.now(UTC)


def parse_views(text: str | None, field: str = "--views") -> list[str]:
    """``a,b`` as feature view names (all views when empty); SpecError naming a wrong one."""
    valid = view_names()
    if not text:
        return valid
    views = [v.strip() for v in text.split(",") if v.strip()]
    for view in views:
        if view in valid:
            continue
        if view in names():
            raise SpecError(f"{field}: '{view}' is a feature service; materialise its views "
                            f"({', '.join(valid)})", field=field)
        raise SpecError(f"{field}: no feature view '{view}'{did_you_mean(view, valid)}; "
                        f"feature views: {', '.join(valid)}", field=field)
    return views


def parse_end(text: str | None, field: str = "--end") -> datetime:
    if not text:
        return _now()
    try:
        end = pd.Timestamp(text)
    except ValueError:
        raise SpecError(f"{field}: '{text}' is not an ISO time (e.g. 2026-11-30T12:00:00Z)",
                        field=field) from None
    return (end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")) \
        .to_pydatetime()


def _data_state(uri: str) -> str:
    """'missing', 'stale' (newest snapshot older than the pool_load TTL) or 'fresh'."""
    import pyarrow.parquet as pq

    path = f"{uri}/{history.POOL_LOAD_FILE}"
    try:
        newest = pq.read_table(path, columns=["event_timestamp"]).column(0).to_pandas().max()
    except (FileNotFoundError, OSError):
        return "missing"
    return "stale" if _now() - newest.to_pydatetime() > POOL_LOAD_TTL else "fresh"


def apply(store, regenerate: bool = False) -> dict:
    uri = data_uri(store)
    state = _data_state(uri)
    local = "://" not in uri
    wrote = None
    if regenerate or state == "missing" or (state == "stale" and local):
        end = pd.Timestamp(_now()).floor(history.SNAPSHOT_EVERY).to_pydatetime()
        h = history.generate(end=end)
        if local:
            history.write(h, uri)
        else:  # s3://: pyarrow's own filesystem (IRSA credentials in the pod), no s3fs
            import pyarrow as pa
            import pyarrow.parquet as pq

            for name, frame in (("jobs", h.jobs), ("pool_load", h.pool_load)):
                pq.write_table(pa.Table.from_pandas(frame, preserve_index=False),
                               f"{uri}/{name}.parquet")
        wrote = {"jobs": len(h.jobs), "pool_load": len(h.pool_load), "end": end.isoformat(),
                 "was": state}
        print(f"wrote the platform's history ({state} before): {len(h.jobs)} jobs, "
              f"{len(h.pool_load)} pool snapshots up to {end:%Y-%m-%d %H:%M} UTC -> {uri}")
    objects = feature_objects(uri)
    store.apply(objects)
    names = [o.name for o in objects]
    print(f"applied {len(objects)} objects to project {store.project}: {', '.join(names)}")
    return {"command": "apply", "data": uri, "generated": wrote, "objects": names,
            "registry": str(store.config.registry.path)}


def _latest_keys(store, view_name: str, end: datetime) -> list[dict]:
    """Entity rows of the newest source rows of a view within its TTL before ``end``."""
    import pyarrow.parquet as pq

    view = store.get_feature_view(view_name)
    source = view.batch_source
    keys = [c.name for c in view.entity_columns]
    ts = source.timestamp_field
    frame = pq.read_table(source.path, columns=[*keys, ts]).to_pandas()
    frame = frame[(frame[ts] <= pd.Timestamp(end)) & (frame[ts] > pd.Timestamp(end) - view.ttl)]
    newest = frame.sort_values(ts).drop_duplicates(keys, keep="last").tail(READ_BACK)
    return [{k: (int(v) if k == "job_id" else v) for k, v in row.items() if k in keys}
            for row in newest.to_dict("records")]


def materialize(store, views: list[str], end: datetime) -> dict:
    connect_ray()
    started = time.monotonic()
    store.materialize_incremental(end_date=end, feature_views=views)
    seconds = time.monotonic() - started
    checked = {}
    for view in views:
        rows = _latest_keys(store, view, end)
        if not rows:
            checked[view] = {"expected": 0, "found": 0}
            continue
        refs = [f"{view}:{f.name}" for f in store.get_feature_view(view).features]
        got = store.get_online_features(features=refs, entity_rows=rows).to_dict()
        first = refs[0].split(":", 1)[1]
        found = sum(v is not None for v in got[first])
        checked[view] = {"expected": len(rows), "found": found}
        if found == 0:
            raise RuntimeError(f"materialize: none of the {len(rows)} newest rows of {view} "
                               f"reached the online store; see the Ray workers' logs "
                               f"(Feast's Ray engine logs failed writes and goes on)")
    print(f"materialised {', '.join(views)} up to {end:%Y-%m-%d %H:%M:%S} UTC in "
          f"{seconds:.1f}s; read back: {json.dumps(checked)}")
    return {"command": "materialize", "views": views, "end": end.isoformat(),
            "seconds": round(seconds, 2), "read_back": checked}


def dataset(store, out: str, entities: str | None = None) -> dict:
    from features import training

    out = str(Path(out).resolve())  # connecting may leave the working directory
    connect_ray()
    started = time.monotonic()
    if entities:
        rows = pd.read_parquet(entities)
        rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
        frame = training.historical(store, rows).to_pandas()
    else:
        frame = training.training_dataset(store).to_pandas()
    frame.to_parquet(out, index=False)
    seconds = time.monotonic() - started
    print(f"wrote {len(frame)} rows to {out} in {seconds:.1f}s")
    return {"command": "dataset", "rows": len(frame), "out": out, "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features.jobs",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ap = sub.add_parser("apply", help="write the history if needed; feast apply")
    ap.add_argument("--regenerate", action="store_true", help="write a new history anyway")
    mp = sub.add_parser("materialize", help="materialise into the online store")
    mp.add_argument("--views", help="comma-separated feature views (default: all)")
    mp.add_argument("--end", help="ISO time to materialise up to (default: now)")
    dp = sub.add_parser("dataset", help="write point-in-time training data to a parquet file")
    dp.add_argument("--out", required=True)
    dp.add_argument("--entities", help="parquet of entity rows (default: the labelled jobs)")
    args = parser.parse_args(argv)
    try:
        if args.command == "materialize":
            views, end = parse_views(args.views), parse_end(args.end)
        store = feature_store()
        if args.command == "apply":
            result = apply(store, args.regenerate)
        elif args.command == "materialize":
            result = materialize(store, views, end)
        else:
            result = dataset(store, args.out, args.entities)
    except RayplaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("RAYPLANE_FEATURES " + json.dumps(result, default=str))
    return 0


__all__ = ["apply", "dataset", "main", "materialize", "parse_end", "parse_views"]

if __name__ == "__main__":
    sys.exit(main())
