"""Online features attached to a chat request: a served model's ``online_features``.

A model of the serve config may name features of the platform's feature store (Feast, the
``features`` package) and the entity they are keyed by::

    models:
      - name: tiny-chat
        online_features:
          features: [pool_load:pending_units, pool_load:free_units, pool_load:mean_wait_1h_s]
          entity: {join_key: pool, from_metadata: pool}
          timeout_ms: 500

A chat request names the entity in OpenAI's ``metadata`` (a string map:
``metadata={"pool": "h100-timeslice"}``). The ingress reads the entity's current values from
the online store and inserts them as a system message after the request's own leading system
messages, so the model reads them as context and ``usage.prompt_tokens`` counts them. The
response header ``x-rayplane-online-features`` says what happened: the features attached
(``pool_load:pending_units,pool_load:free_units``) or ``none; <why>``.

- No entity in the metadata: served without features (``none; metadata.pool missing``), or a
  400 naming ``metadata.pool`` when the model sets ``required: true``.
- A metadata value of the wrong type (not a string, or not an integer for an Int64 key): 400
  naming the field. Unknown entity (no values stored): served without, ``none; no online
  values for pool 'x'``.
- The online store down or slower than ``timeout_ms``: 503 naming the store, never a hang
  (the read runs on a thread and the request stops waiting for it at the timeout).

The spec is checked when the serve config loads, against the feature views the project's
feature repository declares (``features.repo``): an unknown view or feature, or a view keyed
by another entity, is a one-line error naming ``models[i].online_features.features[j]``.
The check reads the repository's plain declaration (no Feast import); Feast is imported only in
the replicas that attach features, never by modules that merely import serve.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from raycluster.spec import Spec, SpecError, did_you_mean

HEADER = "x-rayplane-online-features"
#: OpenAI's request field carrying the entity key (a map of strings).
METADATA = "metadata"
_REF = re.compile(r"^(?P<view>[A-Za-z_][A-Za-z0-9_]*):(?P<feature>[A-Za-z_][A-Za-z0-9_]*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT_TYPES = ("Int32", "Int64")
#: Threads reading the online store per model: a store that hangs holds at most these, and
#: requests beyond them wait in the pool's queue -- still answered 503 at their timeout.
READ_THREADS = 4


@dataclass(frozen=True)
class ViewInfo:
    """What the serve config needs of a feature view: its join keys (name -> Feast type
    name) and feature names."""

    join_keys: dict[str, str]
    features: tuple[str, ...]


def repo_views() -> dict[str, ViewInfo]:
    """The feature views the project's feature repository declares (``features.repo``, plain
    data: reading it imports no Feast)."""
    from features.repo import ENTITIES, VIEWS

    return {v.name: ViewInfo({ENTITIES[v.entity].join_key: ENTITIES[v.entity].dtype},
                             tuple(name for name, _ in v.features)) for v in VIEWS.values()}


def check_features(features: list[str], join_key: str,
                   views: Mapping[str, ViewInfo] | None = None) -> dict[str, str]:
    """Each ``view:feature`` names a feature of a view keyed by ``join_key``; returns the join
    key's type per view. ValueError (``features[j]: ...``, one line) otherwise."""
    views = repo_views() if views is None else views
    types: dict[str, str] = {}
    for j, ref in enumerate(features):
        m = _REF.match(ref)
        if not m:
            raise ValueError(f"features[{j}]: {ref!r} is not 'view:feature' (e.g. "
                             "pool_load:pending_units)")
        view, feature = m["view"], m["feature"]
        if view not in views:
            raise ValueError(f"features[{j}]: unknown feature view {view!r}"
                             f"{did_you_mean(view, list(views))}; views: "
                             f"{', '.join(sorted(views))}")
        info = views[view]
        if feature not in info.features:
            raise ValueError(f"features[{j}]: view {view!r} has no feature {feature!r}"
                             f"{did_you_mean(feature, info.features)}; its features: "
                             f"{', '.join(info.features)}")
        if join_key not in info.join_keys:
            raise ValueError(f"features[{j}]: view {view!r} is keyed by "
                             f"{', '.join(info.join_keys)}, not entity.join_key {join_key!r}")
        types[view] = info.join_keys[join_key]
    return types


class EntityKey(Spec):
    """The entity the features are read for, and where a request names it."""

    join_key: str = Field(description="The entity's join key the feature views are keyed by "
                                      "(e.g. pool).")
    from_metadata: str | None = Field(default=None, description=(
        "Key of the request's OpenAI `metadata` holding the entity's value (default: the "
        "join key)."))

    @field_validator("join_key", "from_metadata")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"{v!r} is not a name (letters, digits, '_')")
        return v

    @property
    def metadata_key(self) -> str:
        return self.from_metadata or self.join_key


class OnlineFeaturesSpec(Spec):
    """Features of the online store attached to each chat request as a system message."""

    features: list[str] = Field(min_length=1, max_length=64, description=(
        "Feature references 'view:feature' (views of the feature repository, features/)."))
    entity: EntityKey = Field(description="The entity the features are keyed by and the "
                                          "request metadata key naming it.")
    required: bool = Field(default=False, description=(
        "Refuse (400) a request whose metadata lacks the entity, instead of serving it "
        "without features."))
    timeout_ms: int = Field(default=500, ge=10, le=30_000, description=(
        "Longest wait for the online store; past it the request is answered 503."))
    store: str | None = Field(default=None, description=(
        "feature_store.yaml on the Ray nodes (default: the platform's: "
        "RAYPLANE_FEATURE_STORE, else the state folder's)."))

    @model_validator(mode="after")
    def _known(self) -> OnlineFeaturesSpec:
        for j, ref in enumerate(self.features):
            if ref in self.features[:j]:
                raise ValueError(f"features[{j}]: {ref!r} is listed twice")
        check_features(self.features, self.entity.join_key)
        return self


class _BadEntity(Exception):
    """The request's entity value, refused by the repository (raised on the read thread)."""

    def __init__(self, error: SpecError):
        super().__init__(str(error))
        self.error = error


class OnlineFeatureError(Exception):
    """A request the online features refuse: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = \
            status, message, param, type_, code


@dataclass(frozen=True)
class Lookup:
    """The outcome for one request: the system message to insert (None: nothing) and the
    header value saying what was attached."""

    text: str | None
    header: str


class OnlineFeatures:
    """A model's online features in a replica: the store is opened when the replica starts
    (off the event loop; again by the next request if that failed) and kept."""

    def __init__(self, spec: Mapping[str, Any]):
        entity = spec["entity"]
        self.features: list[str] = list(spec["features"])
        self.join_key: str = entity["join_key"]
        self.metadata_key: str = entity.get("from_metadata") or self.join_key
        self.required = bool(spec.get("required", False))
        self.timeout_s = float(spec.get("timeout_ms", 500)) / 1000
        self.store_path: str | None = spec.get("store")
        #: Feast type of the join key (Int64 keys are parsed from the metadata's strings).
        self.key_type: str = spec.get("key_type") or "String"
        self._store: Any = None
        # Its own threads, not the loop's default executor: a read stuck in a hung store must
        # not hold a thread that anything else (or the loop's shutdown) waits for.
        self._threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="online-features")
        self._lock = threading.Lock()
        # Import Feast and open the store now, off the event loop, so the first request does
        # not spend its timeout on them; a failure here is retried by the first request.
        self._threads.submit(self._open)

    def _open(self) -> Any:
        from features.store import feature_store

        with self._lock:
            if self._store is None:
                self._store = feature_store(self.store_path)
            return self._store

    @property
    def store_name(self) -> str:
        return self.store_path or "the platform's feature store"

    def entity_value(self, metadata: Any) -> str | int | None:
        """The entity's value from the request's ``metadata``; OnlineFeatureError (400) when
        it has the wrong type."""
        if metadata is None:
            return None
        if not isinstance(metadata, Mapping):
            raise OnlineFeatureError(400, f"{METADATA}: must be an object of string values, "
                                          f"not {type(metadata).__name__}", param=METADATA)
        value = metadata.get(self.metadata_key)
        field = f"{METADATA}.{self.metadata_key}"
        if value is None:
            return None
        if not isinstance(value, str):
            raise OnlineFeatureError(400, f"{field}: must be a string (OpenAI metadata values "
                                          f"are strings), not {type(value).__name__}",
                                     param=field)
        if self.key_type in _INT_TYPES:
            try:
                return int(value)
            except ValueError:
                raise OnlineFeatureError(400, f"{field}: {value!r} is not an integer (the "
                                              f"join key {self.join_key} is {self.key_type})",
                                         param=field) from None
        return value

    def _read(self, value: str | int) -> dict[str, Any]:
        from features.online import online_features, typed_entity

        try:  # the request's value, checked by the repository before any store is touched
            typed_entity(self.join_key, value, self.features[0].split(":", 1)[0],
                         field=METADATA)
        except SpecError as err:
            raise _BadEntity(err) from None
        rows = online_features(self.features, [{self.join_key: value}], store=self._open())
        row = rows[0] if rows else {}
        # Full names (view__feature, view:feature) or Feast's short ones, whichever it gave.
        out = {}
        for ref in self.features:
            view, feature = ref.split(":", 1)
            for key in (ref, f"{view}__{feature}", feature):
                if key in row:
                    out[ref] = row[key]
                    break
        return out

    async def lookup(self, metadata: Any) -> Lookup:
        """What to attach for a request carrying ``metadata``."""
        value = self.entity_value(metadata)
        field = f"{METADATA}.{self.metadata_key}"
        if value is None:
            if self.required:
                raise OnlineFeatureError(400, f"{field}: required (this model attaches online "
                                              f"features keyed by {self.join_key})",
                                         param=field)
            return Lookup(None, f"none; {field} missing")
        try:
            read = asyncio.get_running_loop().run_in_executor(self._threads, self._read, value)
            values = await asyncio.wait_for(read, self.timeout_s)
        except TimeoutError:
            raise OnlineFeatureError(
                503, f"online store of {self.store_name} did not answer within "
                     f"{int(self.timeout_s * 1000)} ms", type_="service_unavailable",
                code="online_store_unavailable") from None
        except _BadEntity as bad:  # features.online refused the value (its type, a pool
            err = bad.error          # the catalog lacks)
            said = _first_line(err).removeprefix(f"{err.field}: " if err.field else "")
            raise OnlineFeatureError(400, f"{field}: {said}", param=field) from None
        except Exception as err:  # noqa: BLE001 - any other failure is the store's: its
            # config (a missing password variable), its registry, its database
            raise OnlineFeatureError(
                503, f"online store of {self.store_name} is unavailable: "
                     f"{type(err).__name__}: {_first_line(err)}", type_="service_unavailable",
                code="online_store_unavailable") from None
        found = {ref: v for ref, v in values.items() if v is not None}
        if not found:
            return Lookup(None, f"none; no online values for {self.join_key} {value!r}")
        return Lookup(system_text(self.join_key, value, found), ",".join(found))


def system_text(join_key: str, value: str | int, found: Mapping[str, Any]) -> str:
    """The system message carrying ``found`` (feature reference -> value) of one entity."""
    shown = ", ".join(f"{ref}={_fmt(v)}" for ref, v in found.items())
    return (f"Online features of {join_key} {value} (the platform's feature store, read "
            f"now): {shown}.")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def system_index(roles: list[str]) -> int:
    """Where the features' system message goes: after the request's leading system (or
    developer) messages, so a chat template that wants the system prompt first still gets it."""
    i = 0
    while i < len(roles) and roles[i] in ("system", "developer"):
        i += 1
    return i


def app_specs(models: list[Any]) -> dict[str, dict[str, Any]]:
    """``args["online_features"]`` of the Serve config: model name -> its spec, with the
    join key's Feast type (the replica parses Int64 keys from the metadata's strings)."""
    out: dict[str, dict[str, Any]] = {}
    views = None
    for m in models:
        spec = getattr(m, "online_features", None)
        if spec is None:
            continue
        views = repo_views() if views is None else views
        types = check_features(spec.features, spec.entity.join_key, views)
        out[m.name] = {**spec.model_dump(mode="json"),
                       "key_type": next(iter(types.values()), "String")}
    return out


__all__ = ["HEADER", "METADATA", "EntityKey", "Lookup", "OnlineFeatureError", "OnlineFeatures",
           "OnlineFeaturesSpec", "ViewInfo", "app_specs", "check_features", "repo_views",
           "system_index", "system_text"]
