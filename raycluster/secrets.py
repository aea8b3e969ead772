"""Secrets on Kubernetes: nothing secret is rendered or committed. External Secrets pulls each
value from AWS Secrets Manager through one ClusterSecretStore (its role may read only the
environment's prefix, and the RDS-managed database password by ARN)."""

from __future__ import annotations

from raycluster import kuberay, monitoring
from raycluster.catalog import Catalog
from raycluster.environments import AgentsServiceSpec, Environment
from raycluster.kuberay.pods import tenant_secret_key
from raycluster.policy import RAY_NAMESPACES, RAY_NODE_LABEL, meta

SECRET_STORE = "aws-secrets-manager"
#: Secrets the add-ons' charts read (infra/helm values): Grafana's admin login
#: (kube-prometheus-stack grafana.admin.existingSecret) and MLflow's database login
#: (mlflow backendStore.existingDatabaseSecret).
GRAFANA_ADMIN_SECRET = "grafana-admin"  # pragma: allowlist secret
MLFLOW_DB_SECRET = "mlflow-db"  # pragma: allowlist secret
MLFLOW_NAMESPACE = "mlops"


def ray_namespaces(catalog: Catalog) -> list[str]:
    return [ns.name for ns in catalog.namespaces if ns.name in RAY_NAMESPACES]


def render_secrets(catalog: Catalog, env: Environment, gcs_ft_namespaces: set[str],
                   api_key_namespaces: dict[str, set[str]] | None = None) -> list[dict]:
    """External Secrets pull the Ray token (one per namespace), the Redis password and the
    API keys (namespace -> its tenants, a key each) from AWS Secrets Manager; nothing secret
    is rendered or committed."""
    store = {"apiVersion": "external-secrets.io/v1", "kind": "ClusterSecretStore",
             "metadata": meta(SECRET_STORE),
             "spec": {"provider": {"aws": {
                 "service": "SecretsManager", "region": env.region,
                 "auth": {"jwt": {"serviceAccountRef": {"name": "external-secrets",
                                                        "namespace": "external-secrets"}}}}}}}
    out = [store]
    for ns in ray_namespaces(catalog):
        out.append(_external_secret(kuberay.AUTH_SECRET, ns, kuberay.AUTH_SECRET_KEY,
                                    f"{env.secrets_manager_prefix}/{ns}/ray-auth-token"))
    for ns in sorted(gcs_ft_namespaces):
        out.append(_external_secret(kuberay.REDIS_SECRET, ns, "password",
                                    f"{env.secrets_manager_prefix}/redis-auth-token"))
    for ns, tenants in sorted((api_key_namespaces or {}).items()):
        remote = f"{env.secrets_manager_prefix}/{ns}/serve-api-keys"
        out.append(_external_secret(kuberay.API_KEYS_SECRET, ns, kuberay.API_KEYS_SECRET_KEY,
                                    remote))
        out[-1]["spec"]["data"] += [{"secretKey": tenant_secret_key(t),
                                     "remoteRef": {"key": f"{remote}/{t}"}} for t in sorted(tenants)]
    return out + render_addon_secrets(env)


def render_addon_secrets(env: Environment) -> list[dict]:
    """The Secrets the add-ons' charts expect to exist (issue 15, finding 3: Grafana's
    ``existingSecret: grafana-admin`` was rendered nowhere, so Grafana never started), each an
    ExternalSecret like the platform's own."""
    grafana = _external_secret(GRAFANA_ADMIN_SECRET, monitoring.STACK_NAMESPACE, "password",
                               f"{env.secrets_manager_prefix}/monitoring/grafana-admin-password")
    # The chart reads the keys admin-user and admin-password; only the password is secret.
    grafana["spec"]["target"]["template"] = {
        "engineVersion": "v2",
        "data": {"admin-user": "admin", "admin-password": "{{ .password }}"}}
    out = [grafana]
    if env.addons.mlflow_db_secret:
        # RDS manages the password (JSON username/password) outside the environment's prefix;
        # External Secrets' role is granted it by ARN, as for the agents' database.
        db = _external_secret(MLFLOW_DB_SECRET, MLFLOW_NAMESPACE, "username",
                              env.addons.mlflow_db_secret)
        db["spec"]["data"] = [{"secretKey": key, "remoteRef": {
            "key": env.addons.mlflow_db_secret, "property": key}} for key in ("username", "password")]
        out.append(db)
    return out


def _external_secret(name: str, namespace: str, key: str, remote: str) -> dict:
    return {"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
            "metadata": meta(name, namespace),
            "spec": {"refreshInterval": "1h",
                     "secretStoreRef": {"kind": "ClusterSecretStore", "name": SECRET_STORE},
                     "target": {"name": name, "creationPolicy": "Owner"},
                     "data": [{"secretKey": key, "remoteRef": {"key": remote}}]}}


def render_agents_plumbing(env: Environment, app: AgentsServiceSpec) -> list[dict]:
    """What an agents RayService needs beside it: its DSN, composed by External Secrets from
    the password RDS manages for the database Terraform creates (JSON username/password,
    outside the environment's prefix; External Secrets' role is granted it by ARN); a key of
    the model endpoint; and egress from its Ray pods to PostgreSQL."""
    db = app.database
    ns = app.namespace
    dsn = (f"postgresql://{{{{ .username | urlquery }}}}:{{{{ .password | urlquery }}}}@"
           f"{db.host}:{db.port}/{db.database}?sslmode={db.sslmode}")
    dsn_secret = _external_secret(kuberay.AGENTS_DB_SECRET, ns, "username", db.secret)
    spec = dsn_secret["spec"]
    spec["data"] = [{"secretKey": key, "remoteRef": {"key": db.secret, "property": key}}
                    for key in ("username", "password")]
    # Only the composed DSN lands in the Kubernetes Secret.
    spec["target"]["template"] = {"engineVersion": "v2",
                                  "data": {kuberay.AGENTS_DB_SECRET_KEY: dsn}}
    model_key = _external_secret(kuberay.MODEL_KEY_SECRET, ns,
                                 kuberay.MODEL_KEY_SECRET_KEY,
                                 f"{env.secrets_manager_prefix}/{ns}/model-api-key")
    egress = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": meta("allow-postgres-egress", ns),
              "spec": {"podSelector": {"matchLabels": {RAY_NODE_LABEL: "true"}},
                       "egress": [{"to": [{"ipBlock": {"cidr": env.vpc_cidr}}],
                                   "ports": [{"protocol": "TCP", "port": db.port}]}],
                       "policyTypes": ["Egress"]}}
    return [dsn_secret, model_key, egress]
