"""Online features: what serving and the agents' tools read at request time.

Reads go straight to the online store (PostgreSQL), no Ray involved. Everything a caller
names is checked against the repository before the store is touched, and a wrong name or
value is a ``SpecError`` naming the field (the CLI prints it as one line, exit 2):

- a feature view or service that does not exist (the valid ones are listed, the near miss
  suggested);
- an entity key the view does not join on, or a value of the wrong type (``job_id=abc``:
  ``job_id`` is an Int64 key), or a pool that is not in the catalog.
"""

from __future__ import annotations

from collections.abc import Iterable

from features.repo import ENTITIES, ENTITY_KEYS, POOL_LOAD, POOLS, SERVICES, VIEWS
from raycluster.spec import SpecError, did_you_mean

#: The five pool_load values ``pool_load_now`` returns.
POOL_LOAD_FEATURES = ("running_units", "pending_units", "free_units", "gpu_utilization",
                      "mean_wait_1h_s")


def names() -> list[str]:
    """Feature views and services a caller may name."""
    return sorted([*VIEWS, *SERVICES])


def view_names() -> list[str]:
    """The repository's feature views (what ``materialize --views`` may name)."""
    return sorted(VIEWS)


def resolve(name: str, field: str = "view") -> str:
    """``name`` when it is a view or service; SpecError listing the valid ones otherwise."""
    if name not in VIEWS and name not in SERVICES:
        raise SpecError(f"{field}: no feature view or service '{name}'{did_you_mean(name, names())}"
                        f"; valid: {', '.join(names())}", field=field)
    return name


def _parts(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """(view, features) that view or service ``name`` reads."""
    resolve(name)
    if name in VIEWS:
        return [(name, tuple(f for f, _ in VIEWS[name].features))]
    return [(v, f or tuple(n for n, _ in VIEWS[v].features)) for v, f in SERVICES[name]]


def join_keys(name: str) -> list[str]:
    """The entity join keys a row for view/service ``name`` must carry."""
    keys: list[str] = []
    for view, _ in _parts(name):
        key = ENTITIES[VIEWS[view].entity].join_key
        if key not in keys:
            keys.append(key)
    return keys


def feature_refs(name: str) -> list[str]:
    """``view:feature`` references of every feature of view or service ``name``."""
    return [f"{view}:{f}" for view, features in _parts(name) for f in features]


def typed_entity(key: str, value: object, name: str, field: str = "entity") -> object:
    """``value`` as the Python value of join key ``key`` of view/service ``name``."""
    valid = join_keys(name)
    if key not in valid:
        raise SpecError(f"{field}: '{key}' is not an entity key of {name}"
                        f"{did_you_mean(key, valid)}; its keys: {', '.join(valid)}", field=field)
    if ENTITY_KEYS.get(key) == "Int64":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise SpecError(f"{field}: {key}={value!r}: {key} is an Int64 key; give a whole "
                            f"number", field=field)
        try:
            return int(value)
        except ValueError:
            raise SpecError(f"{field}: {key}={value}: {key} is an Int64 key; give a whole "
                            f"number", field=field) from None
    if not isinstance(value, str):
        raise SpecError(f"{field}: {key}={value!r}: {key} is a String key", field=field)
    if key == "pool" and value not in POOLS:
        raise SpecError(f"{field}: pool '{value}' is not in the catalog{did_you_mean(value, POOLS)}"
                        f"; pools: {', '.join(POOLS)}", field=field)
    return value


def parse_entities(pairs: Iterable[str], name: str, field: str = "--entity") -> dict:
    """``key=value`` strings (the CLI's ``--entity``) as one typed entity row for ``name``;
    every join key of ``name`` must be given."""
    row: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"{field}: '{pair}' is not key=value (e.g. pool=a100-mig)",
                            field=field)
        row[key.strip()] = typed_entity(key.strip(), value.strip(), name, field)
    missing = [k for k in join_keys(name) if k not in row]
    if missing:
        raise SpecError(f"{field}: {name} needs {', '.join(f'{k}=...' for k in missing)}",
                        field=field)
    return row


def _features(features: list[str]) -> tuple[list[str], set[str]]:
    """Feature refs (a view/service name stands for all its features) and the names used."""
    refs: list[str] = []
    used: set[str] = set()
    for i, item in enumerate(features):
        view, sep, feature = item.partition(":")
        resolve(view, field=f"features[{i}]")
        used.add(view)
        if not sep:
            refs += feature_refs(view)
        elif feature not in {r.split(":", 1)[1] for r in feature_refs(view)}:
            valid = [r.split(":", 1)[1] for r in feature_refs(view)]
            raise SpecError(f"features[{i}]: {view} has no feature '{feature}'"
                            f"{did_you_mean(feature, valid)}; its features: {', '.join(valid)}",
                            field=f"features[{i}]")
        else:
            refs.append(item)
    return refs, used


def online_features(features: list[str], entity_rows: list[dict], store=None) -> list[dict]:
    """Online values of ``features`` (``view:feature`` refs, or a view or service name for all
    of its features) for each of ``entity_rows``: one dict per row, the entity keys plus each
    feature by its name (None when the store holds no fresh value)."""
    refs, used = _features(features)
    typed = []
    for i, row in enumerate(entity_rows):
        out = {}
        for key, value in row.items():
            owner = next((n for n in sorted(used) if key in join_keys(n)), min(used))
            out[key] = typed_entity(key, value, owner, field=f"entity_rows[{i}]")
        typed.append(out)
    if store is None:
        from features.store import feature_store

        store = feature_store()
    result = store.get_online_features(features=refs, entity_rows=typed).to_dict()
    return [{k: v[i] for k, v in result.items()} for i in range(len(typed))]


def pool_load_now(pool: str, store=None) -> dict:
    """The pool's latest load in the online store: the five pool_load values."""
    typed_entity("pool", pool, POOL_LOAD, field="pool")
    row = online_features([POOL_LOAD], [{"pool": pool}], store)[0]
    return {k: row.get(k) for k in POOL_LOAD_FEATURES}


__all__ = ["POOL_LOAD_FEATURES", "feature_refs", "join_keys", "names", "online_features",
           "parse_entities", "pool_load_now", "resolve", "typed_entity", "view_names"]
