"""The agents' checkpointer without a database: where the DSN comes from, that its password
never shows, and the one-line error for a database that is not there."""

from __future__ import annotations

import asyncio

import pytest

from agents.checkpoint import (
    DSN_ENV,
    DSN_FILE_ENV,
    async_postgres_checkpointer,
    dsn_from_env,
    postgres_checkpointer,
    redact_dsn,
)
from raycluster.errors import PlatformError
from raycluster.local import free_port


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://rayplane:s3cret@127.0.0.1:5432/agents",
     "postgresql://rayplane:***@127.0.0.1:5432/agents"),
    ("postgres://u:p%40ss@db.internal/agents?sslmode=require",
     "postgres://u:***@db.internal/agents?sslmode=require"),
    ("postgresql://db/agents?user=u&password=s3cret&sslmode=require",
     "postgresql://db/agents?user=u&password=***&sslmode=require"),
    ("host=db user=u password=s3cret dbname=agents", "host=db user=u password=*** dbname=agents"),
    ("host=db password='s3 cret' dbname=agents", "host=db password=*** dbname=agents"),
    ("postgresql://u@127.0.0.1:5432/agents", "postgresql://u@127.0.0.1:5432/agents"),
])
def test_redact_dsn_hides_the_password_and_keeps_the_rest(dsn, shown):
    assert redact_dsn(dsn) == shown


def test_dsn_from_the_platforms_file(tmp_path):
    path = tmp_path / "postgres_dsn"
    path.write_text("postgresql://rayplane:pw@127.0.0.1:5432/agents\n")
    assert dsn_from_env({DSN_FILE_ENV: str(path)}) == \
        "postgresql://rayplane:pw@127.0.0.1:5432/agents"
    # an explicit DSN for the agents wins over the platform's file
    assert dsn_from_env({DSN_FILE_ENV: str(path), DSN_ENV: "postgresql://other/agents"}) == \
        "postgresql://other/agents"


def test_dsn_from_env_says_what_to_set(tmp_path):
    with pytest.raises(PlatformError, match=rf"no PostgreSQL DSN.*{DSN_FILE_ENV}.*rayplane env"
                                            rf".*{DSN_ENV}"):
        dsn_from_env({})
    with pytest.raises(PlatformError, match=rf"{DSN_FILE_ENV}=.*missing: cannot read the DSN "
                                            r"file.*is the platform up"):
        dsn_from_env({DSN_FILE_ENV: str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PlatformError, match="the DSN file is empty"):
        dsn_from_env({DSN_FILE_ENV: str(tmp_path / "empty")})


def test_an_unreachable_database_is_one_line_without_the_password():
    port = free_port()  # nothing listens there
    dsn = f"postgresql://rayplane:s3cret-pw@127.0.0.1:{port}/agents"
    with pytest.raises(PlatformError) as err:
        postgres_checkpointer(dsn, timeout=3)
    msg = str(err.value)
    assert msg.startswith(f"PostgreSQL at postgresql://rayplane:***@127.0.0.1:{port}/agents "
                          "is unreachable: ")
    assert "refused" in msg.lower()
    assert "s3cret-pw" not in msg and "\n" not in msg

    with pytest.raises(PlatformError) as aerr:
        asyncio.run(async_postgres_checkpointer(dsn, timeout=3))
    assert str(aerr.value).startswith("PostgreSQL at postgresql://rayplane:***@")
    assert "s3cret-pw" not in str(aerr.value)


def test_the_checkpointer_reads_the_dsn_from_the_environment(tmp_path, monkeypatch):
    port = free_port()
    (tmp_path / "dsn").write_text(f"postgresql://rayplane:pw@127.0.0.1:{port}/agents")
    monkeypatch.delenv(DSN_ENV, raising=False)
    monkeypatch.setenv(DSN_FILE_ENV, str(tmp_path / "dsn"))
    with pytest.raises(PlatformError, match=rf"127\.0\.0\.1:{port}/agents is unreachable"):
        postgres_checkpointer(timeout=2)
