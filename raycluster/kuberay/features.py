"""The Feast feature store on EKS (issue 17), rendered from ``env.feature_store``:

- the production ``feature_store.yaml`` (``features.store.repo_config_yaml``: registry and
  offline store in the S3 bucket Terraform makes, online store on the MLflow RDS instance) as a
  ConfigMap, mounted read-only where ``RAYPLANE_FEATURE_STORE`` points;
- the online store's password as an ExternalSecret (Secrets Manager, written by Terraform),
  handed to the pods as the variable the yaml substitutes, never in the yaml or the repository;
- the ``feature-store`` ServiceAccount, whose IRSA role reaches the Feast bucket only;
- the online store's database and role, made on the MLflow instance by a Job (features_db);
- egress from the feature-store pods to PostgreSQL;
- the materialisation (``python -m features.jobs apply``, then ``materialize``) as a RayCronJob
  on the cpu pool;
- the TensorFlow job (``python -m train.duration``) as a RayJob whose worker group is sized
  from its config's pool and workers exactly like the PyTorch training RayJob.

Both jobs run in a Ray namespace (default ``training``): the Ray token, the EFS claim and the
Ray network policies are there. The account, yaml, login and egress are rendered there and in
the namespace of each agents app (``agentic``), whose workers answer ``job_estimate``
(agents/estimates.py: online features and the Keras model ``job-duration``):
``wire_agents_service``. Pure functions: specs in, dicts out.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from raycluster.catalog import Catalog
from raycluster.environments import Environment, WorkerGroupSpec
from raycluster.environments.feature_store import FeatureStore
from raycluster.kuberay.features_db import render_db_bootstrap
from raycluster.kuberay.objects import API_VERSION, ray_cluster_spec
from raycluster.kuberay.pods import secret_env, submitter_template
from raycluster.kuberay.sizing import resolve_group, training_group
from raycluster.policy import (
    CLUSTER_LABEL,
    RAY_NAMESPACES,
    check_namespace,
    meta,
)
from raycluster.spec import SpecError
from train.keras_config import DurationConfig

REPO = Path(__file__).resolve().parents[2]
SERVICE_ACCOUNT = "feature-store"
CONFIG_MAP = "feast-feature-store"
CONFIG_KEY = "feature_store.yaml"
DB_SECRET = "feast-online-store"  # pragma: allowlist secret
#: Where the pods find the yaml (``features.store`` reads RAYPLANE_FEATURE_STORE).
CONFIG_DIR = "/etc/rayplane/features"
CONFIG_ENV = "RAYPLANE_FEATURE_STORE"
#: The variable the production yaml substitutes (``${RAYPLANE_FEAST_DB_PASSWORD}``,
#: features.store.PASSWORD_ENV), from the Secret.
PASSWORD_ENV = "RAYPLANE_FEAST_DB_PASSWORD"  # pragma: allowlist secret
#: Labels the feature-store pods carry: the Postgres egress policy selects them.
POD_LABEL = "rayplane.io/feature-store"
MATERIALIZE = "feast-materialize"
#: ``apply`` first (idempotent, seconds): the registry exists before the first materialisation,
#: and a feature view a team adds reaches the registry with the next image, no step by hand.
#: The Jobs API runs the entrypoint in a shell.
MATERIALIZE_ENTRYPOINT = "python -m features.jobs apply && python -m features.jobs materialize"
#: The TF job's images are the environment's, built with the tensorflow extra (`uv sync
#: --extra tensorflow`; the CUDA build on the GPU image): tags + ``training.image_tag_suffix``.
IMAGE_EXTRAS = "rayplane.io/image-extras"


def feature_store_yaml(fs: FeatureStore) -> str:
    """The production ``feature_store.yaml`` (``features.store.repo_config_yaml``: registry,
    offline data and staging under ``s3://<bucket>/features``, the online store's database
    and role ``feast`` on ``database.host``, TLS required, the password as
    ``${RAYPLANE_FEAST_DB_PASSWORD}``)."""
    from features.store import repo_config_yaml

    db = fs.database
    return repo_config_yaml("production", bucket=fs.bucket, db_host=db.host, db_port=db.port)


def load_duration_config(fs: FeatureStore) -> DurationConfig:
    """The TF job's config (``train.keras_config.DurationConfig``), read from the repository;
    one line naming ``feature_store.training.config`` when it is missing or wrong."""
    assert fs.training is not None
    field = "feature_store.training.config"
    try:
        return DurationConfig.load(REPO / fs.training.config)
    except SpecError as err:
        raise SpecError(f"{field}({fs.training.config}): {err}", field=field) from None


def render_feature_store(catalog: Catalog, env: Environment, *, secret_store: str,
                         mlflow_db: tuple[str, str] | None, config_yaml: str | None = None,
                         duration: DurationConfig | None = None) -> list[dict]:
    """Every object of the feature store (none without ``env.feature_store``). ``secret_store``
    is the ClusterSecretStore of the environment and ``mlflow_db`` (namespace, Secret) MLflow's
    master login, which the database bootstrap uses (raycluster.secrets; None: refused);
    ``config_yaml`` the production yaml (default: ``feature_store_yaml``); ``duration`` the TF
    job's config (default: read from ``training.config``)."""
    fs = env.feature_store
    if fs is None:
        return []
    if mlflow_db is None:
        raise SpecError("feature_store.database: its database and role are made with MLflow's "
                        "master login, which the environment does not name; set "
                        "addons.mlflow_db_secret (Terraform output mlflow_db_secret_arn)",
                        field="feature_store.database")
    ns = fs.namespace
    check_namespace(catalog, ns, "feature_store.namespace")
    if ns not in RAY_NAMESPACES:
        raise SpecError(f"feature_store.namespace: {ns!r} is not a Ray namespace (its Ray token, "
                        f"EFS claim and network policies); valid: {', '.join(RAY_NAMESPACES)}",
                        field="feature_store.namespace")
    text = config_yaml if config_yaml is not None else feature_store_yaml(fs)
    namespaces = store_namespaces(env)
    out = [*store_access(env, fs, secret_store, namespaces, text),
           render_materialize(catalog, env, fs)]
    admin_ns, admin_secret = mlflow_db
    if admin_ns not in namespaces:
        out.append(_db_secret(fs, secret_store, admin_ns))
    out += render_db_bootstrap(env, fs, admin_secret=admin_secret, login_secret=DB_SECRET,
                               namespace=admin_ns)
    if fs.training is not None:
        out.append(render_duration_job(catalog, env, fs,
                                       duration or load_duration_config(fs)))
    return out


def store_namespaces(env: Environment) -> list[str]:
    """Where pods read the feature store: ``feature_store.namespace`` (the jobs), then the
    namespace of each agents app (its workers answer ``job_estimate``), each once."""
    assert env.feature_store is not None
    out = [env.feature_store.namespace]
    for app in env.agents:
        if app.namespace not in out:
            out.append(app.namespace)
    return out


def store_access(env: Environment, fs: FeatureStore, secret_store: str,
                 namespaces: list[str], config_yaml: str) -> list[dict]:
    """In each namespace, what ``wire_feature_store`` pods use: the feature-store account
    (IRSA: the Feast bucket), the yaml's ConfigMap, the login's ExternalSecret and egress to
    the online store's port."""
    out: list[dict] = []
    for ns in namespaces:
        out += [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": meta(SERVICE_ACCOUNT, ns, annotations={
                 "eks.amazonaws.com/role-arn": fs.role_arn}),
             # Only the Ray heads mount a token (their autoscaler), as for the `ray` account.
             "automountServiceAccountToken": False},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(CONFIG_MAP, ns),
             "data": {CONFIG_KEY: config_yaml}},
            _db_secret(fs, secret_store, ns),
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": meta("allow-feature-store-egress", ns),
             "spec": {"podSelector": {"matchLabels": {POD_LABEL: "true"}},
                      "egress": [{"to": [{"ipBlock": {"cidr": env.vpc_cidr}}],
                                  "ports": [{"protocol": "TCP", "port": fs.database.port}]}],
                      "policyTypes": ["Egress"]}},
        ]
    return out


def _db_secret(fs: FeatureStore, store: str, namespace: str) -> dict:
    remote = fs.database.secret
    return {"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
            "metadata": meta(DB_SECRET, namespace),
            "spec": {"refreshInterval": "1h",
                     "secretStoreRef": {"kind": "ClusterSecretStore", "name": store},
                     "target": {"name": DB_SECRET, "creationPolicy": "Owner"},
                     # The user is in the yaml (the role is named after the database).
                     "data": [{"secretKey": "password",  # pragma: allowlist secret
                               "remoteRef": {"key": remote, "property": "password"}}]}}


def _job(catalog: Catalog, env: Environment, fs: FeatureStore, *, name: str, entrypoint: str,
         groups: list, priority_class: str, deadline: int, backoff: int, field: str) -> dict:
    """A RayJob spec (as ``objects.rayjob_spec``) whose pods reach the feature store: the
    feature-store account, the yaml, the login, the egress label."""
    cluster = ray_cluster_spec(catalog, env, cluster=name, namespace=fs.namespace,
                               priority_class=priority_class, groups=groups, field=field)
    for template in [cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster["workerGroupSpecs"])]:
        wire_feature_store(template)
    runtime_env = {"env_vars": {"RAYPLANE_ENV": env.name}}
    return {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_template(env, name, fs.namespace),
        "submitterConfig": {"backoffLimit": 2},
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "activeDeadlineSeconds": deadline,
        "backoffLimit": backoff,
        "rayClusterSpec": cluster,
    }


def wire_feature_store(template: dict) -> None:
    """Give a Ray pod the feature store: the IRSA account, the yaml (read-only), the password
    as the variable the yaml substitutes, the label the egress policy selects."""
    spec = template["spec"]
    spec["serviceAccountName"] = SERVICE_ACCOUNT
    template["metadata"]["labels"][POD_LABEL] = "true"
    spec["volumes"].append({"name": "feature-store", "configMap": {"name": CONFIG_MAP}})
    container = spec["containers"][0]
    container["volumeMounts"].append({"name": "feature-store", "mountPath": CONFIG_DIR,
                                      "readOnly": True})
    container["env"].append({"name": CONFIG_ENV, "value": f"{CONFIG_DIR}/{CONFIG_KEY}"})
    secret_env(template, PASSWORD_ENV, DB_SECRET, "password",
               why="features.store substitutes ${RAYPLANE_FEAST_DB_PASSWORD} in "
                   "feature_store.yaml from the environment (the online store's password)")


def wire_agents_service(env: Environment, service: dict) -> None:
    """``job_estimate`` on an agents RayService (nothing without ``env.feature_store``): its
    workers, where the API replicas and the MCP server run, get the feature store
    (``wire_feature_store``; the head runs no replica and keeps the ``ray`` account its
    autoscaler is bound to). The tool loads the Keras model ``job-duration``: where the
    environment trains it (``feature_store.training``), head and workers run the images with
    the tensorflow extra (tags + ``image_tag_suffix``, as the TF RayJob); without TensorFlow the
    tool answers an error and the agents go on."""
    fs = env.feature_store
    if fs is None:
        return
    cluster = service["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        wire_feature_store(group["template"])
    if fs.training is not None:
        for template in [cluster["headGroupSpec"]["template"],
                         *(g["template"] for g in cluster["workerGroupSpecs"])]:
            template["spec"]["containers"][0]["image"] += fs.training.image_tag_suffix
        service["metadata"].setdefault("annotations", {})[IMAGE_EXTRAS] = "tensorflow"


def render_materialize(catalog: Catalog, env: Environment, fs: FeatureStore) -> dict:
    """``features.jobs materialize`` on a schedule: one worker of the cpu pool (Feast's Ray
    engine reads the offline parquet there and writes the online rows), at the namespace's
    default priority."""
    field = "feature_store.materialize"
    group = resolve_group(catalog, WorkerGroupSpec(pool=catalog.head_pool.name, min_replicas=1,
                                                   max_replicas=1, idle_timeout_seconds=60),
                          f"{field}.worker_group")
    entrypoint = MATERIALIZE_ENTRYPOINT
    if fs.materialize.views:
        entrypoint += f" --views {','.join(fs.materialize.views)}"
    job = _job(catalog, env, fs, name=MATERIALIZE, entrypoint=entrypoint, groups=[group],
               priority_class=_default_priority(catalog, fs.namespace), deadline=3600,
               backoff=1, field=field)
    return {"apiVersion": API_VERSION, "kind": "RayCronJob",
            "metadata": meta(MATERIALIZE, fs.namespace, labels={CLUSTER_LABEL: MATERIALIZE}),
            "spec": {"schedule": fs.materialize.schedule, "timeZone": fs.materialize.time_zone,
                     "suspend": False, "jobTemplate": job}}


def render_duration_job(catalog: Catalog, env: Environment, fs: FeatureStore,
                        cfg: DurationConfig) -> dict:
    """The TF RayJob: its worker group from the config's pool and ``num_workers`` (the same
    ``training_group`` as the PyTorch RayJob: one GPU unit per worker on a GPU pool), at the
    pool's priority; the image is the GPU image with the tensorflow extra."""
    training = fs.training
    assert training is not None
    field = f"feature_store.training.config({training.config})"
    # DurationConfig carries TrainConfig's run fields (pool, num_workers): the same sizing.
    group = training_group(catalog, cfg, field=field)  # type: ignore[arg-type]
    name = cfg.name.lower().replace("_", "-").replace(".", "-")
    job = _job(catalog, env, fs, name=name,
               entrypoint=f"python -m train.duration --config {training.config}",
               groups=[group], priority_class=group.pool.priority_class,
               deadline=training.active_deadline_seconds, backoff=training.backoff_limit,
               field="feature_store.training")
    cluster = job["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster["workerGroupSpecs"])]:
        # The driver (head) imports Keras too: both images carry the extra.
        container = template["spec"]["containers"][0]
        container["image"] += training.image_tag_suffix
    metadata = meta(name, fs.namespace, labels={CLUSTER_LABEL: name, "rayplane.io/run": cfg.name},
                    annotations={IMAGE_EXTRAS: "tensorflow"})
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": metadata, "spec": job}


def _default_priority(catalog: Catalog, namespace: str) -> str:
    ns = next(n for n in catalog.namespaces if n.name == namespace)
    return ns.default_priority_class or catalog.head_pool.priority_class


__all__ = [
    "CONFIG_MAP",
    "DB_SECRET",
    "MATERIALIZE",
    "SERVICE_ACCOUNT",
    "load_duration_config",
    "feature_store_yaml",
    "render_duration_job",
    "render_feature_store",
    "render_materialize",
    "store_access",
    "store_namespaces",
    "wire_agents_service",
    "wire_feature_store",
]
