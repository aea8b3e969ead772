"""The feature store's online database on the MLflow RDS instance: a database and a login role
of its own (``feast``), made by a Job that Argo CD runs on every sync of the platform
Application (a Sync hook, replaced each time), with MLflow's master login. RDS's API makes one
database per instance (MLflow's) and the project's Terraform has no PostgreSQL provider, so
this is where the role and database come from; the Job is idempotent and sets the role's
password from Secrets Manager each time, so a rotated password is applied by the next sync.

It runs in ``mlops``, beside the ``mlflow-db`` Secret (the master login) and a copy of the
``feast-online-store`` Secret; both are mounted as files, never env variables. Its pod meets
``restricted`` and may reach only PostgreSQL in the VPC (and DNS)."""

from __future__ import annotations

from raycluster.environments import Environment
from raycluster.environments.feature_store import FeatureStore
from raycluster.policy import (
    ROLE_LABEL,
    container_security_context,
    meta,
    pod_security_context,
)

BOOTSTRAP = "feast-db-bootstrap"
#: What the Job runs (the CPU image has psycopg: feast[postgres]). Idempotent: the role and the
#: database are created when missing; the password is (re)set from the secret every time, as
#: its SCRAM verifier (libpq's PQencryptPasswordConn), since MLflow's instance logs DDL
#: statements (log_statement = ddl) and a plain PASSWORD would land in CloudWatch.
#: PostgreSQL 16+ gives the creator of a role ADMIN on it but not SET, which CREATE DATABASE
#: ... OWNER needs: it grants itself the role first.
SCRIPT = """\
import os, pathlib, psycopg
from psycopg import sql
secrets = pathlib.Path(os.environ.get("SECRETS_DIR", "/var/run/secrets"))
read = lambda name: (secrets / name).read_text().strip()
role = os.environ["FEAST_DB"]
admin = psycopg.connect(host=os.environ["DB_HOST"], port=os.environ["DB_PORT"], dbname="postgres",
    user=read("mlflow-db/username"), password=read("mlflow-db/password"),
    sslmode=os.environ.get("DB_SSLMODE", "require"), autocommit=True)
with admin, admin.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    verb = "ALTER" if cur.fetchone() else "CREATE"
    # Only the SCRAM verifier crosses the wire: the instance logs DDL (log_statement).
    verifier = admin.pgconn.encrypt_password(
        read("feast/password").encode(), role.encode(), b"scram-sha-256").decode()
    cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(verifier)))
    cur.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (role,))
    if not cur.fetchone():
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(role), sql.Identifier(role)))
print(f"role and database {role}: {'created' if verb == 'CREATE' else 'password set'}, ready")
"""
_SKIPS = {
    "CKV_K8S_8": "a run-to-completion bootstrap Job has nothing to probe",
    "CKV_K8S_9": "a run-to-completion bootstrap Job has nothing to probe",
    "CKV_K8S_15": "ECR tags are immutable, so IfNotPresent cannot run a stale image",
    "CKV_K8S_40": "the rayplane image's user is uid 1000, owner of its Python environment; "
                  "restricted only requires non-root",
    "CKV_K8S_43": "images are pinned by immutable ECR tag; the digest exists only after CI "
                  "pushes",
}


def render_db_bootstrap(env: Environment, fs: FeatureStore, *, admin_secret: str,
                        login_secret: str, namespace: str) -> list[dict]:
    """The Job and the egress it needs, in ``namespace`` (MLflow's), where ``admin_secret``
    (the master login, keys username/password) and ``login_secret`` (Feast's, key password)
    are."""
    skips = {f"checkov.io/skip{i}": f"{check}={reason}"
             for i, (check, reason) in enumerate(sorted(_SKIPS.items()), start=1)}
    labels = {ROLE_LABEL: BOOTSTRAP}
    container = {
        "name": "bootstrap",
        "image": env.images.image(gpu=False),
        "imagePullPolicy": env.images.pull_policy,
        "command": ["python", "-c", SCRIPT],
        "env": [{"name": "DB_HOST", "value": fs.database.host},
                {"name": "DB_PORT", "value": str(fs.database.port)},
                {"name": "FEAST_DB", "value": "feast"},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"cpu": "500m", "memory": "256Mi"}},
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "mlflow-db", "mountPath": "/var/run/secrets/mlflow-db",
                          "readOnly": True},
                         {"name": "feast", "mountPath": "/var/run/secrets/feast",
                          "readOnly": True}],
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": meta(BOOTSTRAP, namespace, labels=labels, annotations={
            # Run on every sync of the platform Application, the last run replaced first (a
            # Job's pod template is immutable, so a plain resource could never change).
            "argocd.argoproj.io/hook": "Sync",
            "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation",
            **skips}),
        "spec": {
            "backoffLimit": 4,
            "activeDeadlineSeconds": 600,
            "template": {
                "metadata": {"labels": labels, "annotations": dict(skips)},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}},
                                {"name": "mlflow-db", "secret": {"secretName": admin_secret,
                                                                 "defaultMode": 0o440}},
                                {"name": "feast", "secret": {"secretName": login_secret,
                                                             "defaultMode": 0o440}}],
                },
            },
        },
    }
    egress = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": meta("allow-feast-db-bootstrap", namespace),
              "spec": {"podSelector": {"matchLabels": labels},
                       "egress": [{"to": [{"ipBlock": {"cidr": env.vpc_cidr}}],
                                   "ports": [{"protocol": "TCP", "port": fs.database.port}]}],
                       "policyTypes": ["Egress"]}}
    return [job, egress]


__all__ = ["BOOTSTRAP", "SCRIPT", "render_db_bootstrap"]
