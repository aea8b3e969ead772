"""Where the feature store lives: its ``feature_store.yaml``, locally and on EKS.

One layout, two places (``<root>`` is ``$RAYPLANE_STATE_DIR/features`` locally, the features
bucket's ``s3://<bucket>/features`` on EKS):

- ``<root>/feature_store.yaml`` (EKS: a ConfigMap), the repo config;
- ``<root>/registry.db``: Feast's file registry (on S3 in production);
- ``<root>/data/``: the offline data, the parquet files the feature views read;
- ``<root>/staging/``: where the Ray offline store writes retrieval results.

Stores (issue 17): the offline store is Feast's Ray offline store (contrib, pinned with feast
0.67) and materialisation runs on Feast's Ray compute engine, both on the Ray that the job is
already connected to (:func:`connect_ray`: never KubeRay/CodeFlare mode, which would try to
create a cluster of its own). The online store is PostgreSQL: the platform's own locally
(database ``feast``), RDS on EKS -- the same store type in both places, so what the tests
exercise is what runs in production.

Secrets: the yaml never holds the database password. It names ``${RAYPLANE_FEAST_DB_PASSWORD}``
and :func:`load_config` substitutes it when reading: from that variable (EKS: the
ExternalSecret's key in the pod's env), else from the platform's DSN file
(``$RAYPLANE_POSTGRES_DSN_FILE``, what the local platform writes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from raycluster import rayjob
from raycluster.catalog import load_catalog
from raycluster.spec import SpecError

FEATURES_DIR = "features"
CONFIG_FILE = "feature_store.yaml"
#: Names another feature_store.yaml (EKS: the mounted ConfigMap).
CONFIG_ENV = "RAYPLANE_FEATURE_STORE"
PASSWORD_ENV = "RAYPLANE_FEAST_DB_PASSWORD"  # pragma: allowlist secret (a variable name)
DSN_FILE_ENV = "RAYPLANE_POSTGRES_DSN_FILE"
STATE_ENV = "RAYPLANE_STATE_DIR"
DATABASE = "feast"
PROJECT = "rayplane"
ENVIRONMENTS = ("local", "production")
#: What the production online store logs in as (a role of its own on the RDS instance).
PRODUCTION_DB_USER = "feast"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class StoreLayout:
    """The URIs of a feature store rooted at ``root`` (a folder or an s3:// prefix)."""

    root: str

    def _join(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    @property
    def config(self) -> str:
        return self._join(CONFIG_FILE)

    @property
    def registry(self) -> str:
        return self._join("registry.db")

    @property
    def data(self) -> str:
        return self._join("data")

    @property
    def staging(self) -> str:
        return self._join("staging")


def local_layout(state_dir: Path | str) -> StoreLayout:
    return StoreLayout(str(Path(state_dir).resolve() / FEATURES_DIR))


def production_layout(bucket: str) -> StoreLayout:
    return StoreLayout(f"s3://{bucket}/{FEATURES_DIR}")


def repo_config(environment: str = "local", *, state_dir: Path | str | None = None,
                db_host: str = "127.0.0.1", db_port: int = 5432, db_user: str | None = None,
                bucket: str | None = None) -> dict:
    """The repo config as a dict (the password as ``${RAYPLANE_FEAST_DB_PASSWORD}``).

    local: registry, data and staging under ``<state_dir>/features``; the platform's
    PostgreSQL on loopback without TLS. production: registry, data and staging in the features
    bucket; RDS PostgreSQL at ``db_host`` with TLS required."""
    if environment not in ENVIRONMENTS:
        raise SpecError(f"environment: '{environment}' is not one of {', '.join(ENVIRONMENTS)}",
                        field="environment")
    if environment == "local":
        if state_dir is None:
            raise SpecError("state_dir: the local feature store needs the platform's state "
                            "folder (RAYPLANE_STATE_DIR)", field="state_dir")
        layout, user, sslmode = local_layout(state_dir), db_user or "rayplane", "disable"
    else:
        if not bucket:
            raise SpecError("bucket: the production feature store needs its S3 bucket",
                            field="bucket")
        layout, user, sslmode = production_layout(bucket), db_user or PRODUCTION_DB_USER, \
            "require"
    registry = {"registry_type": "file", "path": layout.registry, "cache_ttl_seconds": 60}
    return {
        "project": PROJECT,
        "provider": "local",
        "registry": registry,
        # Ray offline store (contrib): no ray_address and no KubeRay settings, so Feast uses
        # the Ray the process is connected to (connect_ray) and never starts one.
        "offline_store": {"type": "ray", "storage_path": layout.staging},
        "batch_engine": {"type": "ray.engine", "write_concurrency": 2},
        "online_store": {"type": "postgres", "host": db_host, "port": int(db_port),
                         "database": DATABASE, "db_schema": "public", "user": user,
                         "password": f"${{{PASSWORD_ENV}}}", "sslmode": sslmode},
        "entity_key_serialization_version": 3,
    }


def repo_config_yaml(environment: str = "local", **kwargs) -> str:
    """:func:`repo_config` as the text of a ``feature_store.yaml`` (H3 renders the production
    one into a ConfigMap: ``repo_config_yaml("production", bucket=..., db_host=...)``)."""
    header = ("# Feast repo config of the rayplane feature store (features/store.py); the "
              "password comes from\n# the environment (${" + PASSWORD_ENV + "}), never "
              "from this file.\n")
    return header + yaml.safe_dump(repo_config(environment, **kwargs), sort_keys=False)


def _dsn(dsn_file: Path | str) -> tuple[str, int, str, str]:
    dsn = urlsplit(Path(dsn_file).read_text().strip())
    return dsn.hostname or "127.0.0.1", dsn.port or 5432, dsn.username or "", dsn.password or ""


def write_local_config(state_dir: Path | str, dsn_file: Path | str | None = None) -> Path:
    """Write ``<state>/features/feature_store.yaml`` for the local platform (its PostgreSQL's
    host, port and user from the DSN file; not the password). Returns the path."""
    dsn_file = dsn_file or Path(state_dir) / "postgres_dsn"
    host, port, user, _ = _dsn(dsn_file)
    path = Path(local_layout(state_dir).config)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = repo_config_yaml("local", state_dir=state_dir, db_host=host, db_port=port,
                            db_user=user)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def config_path(path: Path | str | None = None) -> Path:
    """The yaml to use: ``path``, else ``$RAYPLANE_FEATURE_STORE``, else the local platform's
    (written from ``$RAYPLANE_STATE_DIR`` and ``$RAYPLANE_POSTGRES_DSN_FILE`` when missing)."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if chosen:
        if not Path(chosen).is_file():
            raise SpecError(f"{CONFIG_ENV}: {chosen} is not a file", field=CONFIG_ENV)
        return Path(chosen)
    state = os.environ.get(STATE_ENV)
    if not state:
        raise SpecError(f"{CONFIG_ENV}: no feature store config; set {CONFIG_ENV} or "
                        f"{STATE_ENV} (`rayplane env`)", field=CONFIG_ENV)
    local = Path(local_layout(state).config)
    if not local.is_file():
        dsn = os.environ.get(DSN_FILE_ENV) or str(Path(state) / "postgres_dsn")
        if not Path(dsn).is_file():
            raise SpecError(f"{DSN_FILE_ENV}: {dsn} does not exist; is the platform up "
                            f"(`rayplane up`)?", field=DSN_FILE_ENV)
        write_local_config(state, dsn)
    return local


def _secrets() -> dict[str, str]:
    """What ``${...}`` in the yaml may name: the environment, plus the database password
    from the platform's DSN file (``$RAYPLANE_POSTGRES_DSN_FILE``, else the state folder's)
    when the environment does not carry it."""
    values = dict(os.environ)
    dsn = os.environ.get(DSN_FILE_ENV)
    if not dsn and os.environ.get(STATE_ENV):
        # Ray workers and job drivers of the local platform carry the state folder only.
        dsn = str(Path(os.environ[STATE_ENV]) / "postgres_dsn")
    if PASSWORD_ENV not in values and dsn and Path(dsn).is_file():
        values[PASSWORD_ENV] = _dsn(dsn)[3]
    return values


def load_config(path: Path | str | None = None):
    """The ``feast.RepoConfig`` of the yaml at :func:`config_path`, ``${VAR}`` substituted;
    SpecError naming the variable when one is not set."""
    from feast.repo_config import RepoConfig

    path = config_path(path)
    values = _secrets()

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise SpecError(f"{name}: {path} needs the environment variable {name}",
                            field=name)
        return values[name]

    raw = yaml.safe_load(_VAR.sub(sub, Path(path).read_text()))
    config = RepoConfig(**raw)
    config.repo_path = Path(path).parent
    return config


def connect_ray() -> None:
    """Connect this process to the running Ray cluster (a Ray job's driver: its RAY_ADDRESS)
    before Feast looks: Feast's Ray initialiser then finds Ray initialised and uses it, instead
    of starting a local Ray or going through CodeFlare."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "auto")
    # A client's RAY_ADDRESS is the dashboard (Jobs API); a driver joins through the GCS.
    ray.init(address="auto" if address.startswith("http") else address,
             log_to_driver=False, logging_level="WARNING")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if rayjob.in_submitted_job() and rayjob.cluster_is_local(load_catalog(), nodes):
        # Feast's Ray Data tasks import Feast, which needs a working directory that exists.
        rayjob.settle_working_dir(nodes)


def feature_store(config_path: Path | str | None = None):
    """A ``feast.FeatureStore`` on the config at :func:`config_path`."""
    from feast import FeatureStore

    config = load_config(config_path)
    return FeatureStore(repo_path=str(config.repo_path), config=config)


def data_uri(store) -> str:
    """Where the store's offline data lives: ``data/`` beside its staging folder."""
    staging = store.config.offline_store.storage_path
    return f"{staging.rstrip('/').rsplit('/', 1)[0]}/data"


__all__ = ["CONFIG_ENV", "DATABASE", "ENVIRONMENTS", "PASSWORD_ENV", "PROJECT", "StoreLayout",
           "config_path", "connect_ray", "data_uri", "feature_store", "load_config",
           "local_layout", "production_layout", "repo_config", "repo_config_yaml",
           "write_local_config"]
