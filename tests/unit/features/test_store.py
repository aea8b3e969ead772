"""The feature store's repo config (features.store): the local yaml on the platform's
PostgreSQL, the production one on S3 and RDS, and the password never written into either."""

from __future__ import annotations

import pytest
import yaml

from features import store
from raycluster.spec import SpecError

PASSWORD = "s3cr3t-not-in-yaml"  # pragma: allowlist secret (a test fake)


@pytest.fixture
def platform_state(tmp_path, monkeypatch):
    """A state folder as the local platform leaves it: the DSN file (with the password)."""
    dsn = tmp_path / "postgres_dsn"
    dsn.write_text(f"postgresql://rayplane:{PASSWORD}@127.0.0.1:54329/agents")
    for name in (store.CONFIG_ENV, store.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAYPLANE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("RAYPLANE_POSTGRES_DSN_FILE", str(dsn))
    return tmp_path


def test_local_yaml_names_the_stores_and_not_the_password(platform_state):
    path = store.config_path()
    assert path == platform_state / "features" / "feature_store.yaml"
    text = path.read_text()
    assert PASSWORD not in text and "${RAYPLANE_FEAST_DB_PASSWORD}" in text
    config = yaml.safe_load(text.split("\n", 2)[2])
    root = str(platform_state / "features")
    assert config["registry"]["path"] == f"{root}/registry.db"
    assert config["offline_store"] == {"type": "ray", "storage_path": f"{root}/staging"}
    assert config["batch_engine"]["type"] == "ray.engine"
    online = config["online_store"]
    assert (online["type"], online["host"], online["port"], online["database"],
            online["user"], online["sslmode"]) == ("postgres", "127.0.0.1", 54329, "feast",
                                                   "rayplane", "disable")
    # Nothing that would make Feast's Ray initialiser start or look for a cluster of its own.
    assert not {"ray_address", "use_kuberay", "kuberay_conf"} & set(config["offline_store"])


def test_loading_substitutes_the_password_from_the_dsn_file(platform_state):
    config = store.load_config()
    assert config.online_store.password == PASSWORD
    assert config.offline_store.type == "ray" and config.batch_engine.type == "ray.engine"
    assert str(config.repo_path) == str(platform_state / "features")


def test_the_environment_variable_wins_over_the_dsn_file(platform_state, monkeypatch):
    monkeypatch.setenv(store.PASSWORD_ENV, "from-the-secret")
    assert store.load_config().online_store.password == "from-the-secret"  # pragma: allowlist secret


def test_without_the_dsn_variable_the_state_folders_dsn_file_is_read(platform_state,
                                                                      monkeypatch):
    """Ray workers and job drivers of the local platform carry RAYPLANE_STATE_DIR only."""
    monkeypatch.delenv("RAYPLANE_POSTGRES_DSN_FILE")
    assert store.load_config().online_store.password == PASSWORD


def test_a_variable_the_yaml_names_but_nobody_sets_is_named(platform_state, monkeypatch):
    store.config_path()  # the yaml is written while the platform's files are there
    monkeypatch.delenv("RAYPLANE_POSTGRES_DSN_FILE")
    (platform_state / "postgres_dsn").unlink()
    with pytest.raises(SpecError, match="needs the environment variable "
                                        "RAYPLANE_FEAST_DB_PASSWORD") as err:
        store.load_config()
    assert err.value.field == store.PASSWORD_ENV


def test_production_yaml_keeps_everything_on_s3_and_rds_with_tls():
    text = store.repo_config_yaml("production", bucket="rayplane-features-123",
                                  db_host="feast.abc.eu-west-1.rds.amazonaws.com")
    config = yaml.safe_load(text)
    root = "s3://rayplane-features-123/features"
    assert config["registry"]["path"] == f"{root}/registry.db"
    assert config["offline_store"]["storage_path"] == f"{root}/staging"
    online = config["online_store"]
    assert online["host"] == "feast.abc.eu-west-1.rds.amazonaws.com"
    assert online["sslmode"] == "require" and online["user"] == "feast"
    assert online["password"] == "${RAYPLANE_FEAST_DB_PASSWORD}"


@pytest.mark.parametrize("kwargs, field", [
    ({"environment": "staging"}, "environment"),
    ({"environment": "production"}, "bucket"),
    ({"environment": "local"}, "state_dir"),
])
def test_a_config_that_cannot_be_rendered_names_the_field(kwargs, field):
    with pytest.raises(SpecError) as err:
        store.repo_config(**kwargs)
    assert err.value.field == field


def test_rayplane_feature_store_names_another_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv(store.CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(SpecError, match="RAYPLANE_FEATURE_STORE: .*missing.yaml is not a file"):
        store.config_path()
