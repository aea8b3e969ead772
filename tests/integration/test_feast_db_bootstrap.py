"""The feature store's database bootstrap (raycluster/kuberay/features_db.py), for real: the
exact script the rendered Job runs, against the session platform's PostgreSQL (its superuser
standing in for RDS's master login): it makes the role and its database, the role logs in to
its database with the secret's password, a second run is a no-op that sets a rotated password,
and no plain password reaches the server's statements (only the SCRAM verifier)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from raycluster.kuberay.features_db import SCRIPT


def run_bootstrap(secrets: Path, host: str, port: int, role: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SECRETS_DIR": str(secrets), "DB_HOST": host, "DB_PORT": str(port),
           "FEAST_DB": role, "DB_SSLMODE": "disable"}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def write(folder: Path, name: str, value: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(value + "\n")


@pytest.mark.integration
def test_the_bootstrap_makes_the_role_and_database_idempotently(local_cluster, tmp_path: Path):
    dsn = urlsplit(local_cluster.postgres.dsn("postgres"))
    role = f"feast_{uuid.uuid4().hex[:8]}"  # never the platform's own feast database
    secrets = tmp_path / "secrets"
    write(secrets / "mlflow-db", "username", dsn.username)
    write(secrets / "mlflow-db", "password", dsn.password)
    write(secrets / "feast", "password", "first-Pw-1")
    admin = psycopg.connect(local_cluster.postgres.dsn("postgres"), autocommit=True)
    try:
        first = run_bootstrap(secrets, dsn.hostname, dsn.port, role)
        assert first.returncode == 0, first.stderr
        assert f"role and database {role}: created, ready" in first.stdout
        with psycopg.connect(host=dsn.hostname, port=dsn.port, dbname=role, user=role,
                             password="first-Pw-1") as conn:  # pragma: allowlist secret
            owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                 "WHERE datname = current_database()").fetchone()[0]
            assert owner == role
            # Feast creates its tables in a schema of its own: the owner may.
            conn.execute("CREATE SCHEMA IF NOT EXISTS feast_test AUTHORIZATION CURRENT_USER")
        stored = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                               (role,)).fetchone()[0]
        assert stored.startswith("SCRAM-SHA-256$")

        # Rotated in Secrets Manager: the next sync's run sets it; the old one stops working.
        write(secrets / "feast", "password", "second-Pw-2")
        second = run_bootstrap(secrets, dsn.hostname, dsn.port, role)
        assert second.returncode == 0, second.stderr
        assert f"role and database {role}: password set, ready" in second.stdout
        with psycopg.connect(host=dsn.hostname, port=dsn.port, dbname=role, user=role,
                             password="second-Pw-2"):  # pragma: allowlist secret
            pass
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host=dsn.hostname, port=dsn.port, dbname=role, user=role,
                            password="first-Pw-1")  # pragma: allowlist secret
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{role}" WITH (FORCE)')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()
