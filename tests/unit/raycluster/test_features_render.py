"""The Feast feature store on EKS (issue 17): the production feature_store.yaml as a ConfigMap,
the online store's login as an ExternalSecret (never in the yaml or the repository), the
feature-store IRSA account, the materialisation RayCronJob on the cpu pool and the TF RayJob on
a100-timeslice sized like the PyTorch RayJob; the names agree with Terraform's. Every object is
also checked by test_render.py (its CRD or the Kubernetes schema, `restricted`, drift)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from features.store import DATABASE as STORE_DATABASE
from raycluster.environments import Environment, RayJobSpec
from raycluster.kuberay import features, features_db, render_rayjob
from raycluster.kuberay.features import load_duration_config, render_feature_store
from raycluster.render import KIND_ORDER, load_inputs, render_objects
from raycluster.secrets import MLFLOW_DB_SECRET, MLFLOW_NAMESPACE, SECRET_STORE
from raycluster.spec import SpecError
from tests.support.infra import pod_templates
from train.config import TrainConfig

REPO = Path(__file__).resolve().parents[3]
PLATFORM_SERVICES = REPO / "infra" / "terraform" / "modules" / "platform-services"
CONFIG = "feature_store.yaml"
MLFLOW_DB = (MLFLOW_NAMESPACE, MLFLOW_DB_SECRET)
#: The database and role Terraform's login is for (variables.tf feature_store_db_name).
TF_DB_NAME = re.search(r'variable "feature_store_db_name" \{.*?default\s+= "(\w+)"',
                       (PLATFORM_SERVICES / "variables.tf").read_text(), re.DOTALL)[1]


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


def find(objects, kind, name, namespace="training"):
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
              and o["metadata"].get("namespace") == namespace]
    return obj


def ray_templates(obj):
    """(where, template) of the Ray pods (head and workers), not the submitter."""
    return [(w, t) for w, t in pod_templates(obj) if not w.endswith("submitterPodTemplate")]


def env_of(template) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in
            template["spec"]["containers"][0]["env"]}


def with_feature_store(env: Environment, **changes) -> Environment:
    data = env.model_dump(mode="json")
    data["feature_store"].update(changes)
    return Environment.parse(data)


def test_the_yaml_is_the_production_one_with_no_secret(objects, env):
    fs = env.feature_store
    cm = find(objects, "ConfigMap", features.CONFIG_MAP)
    assert cm["data"][CONFIG] == features.feature_store_yaml(fs)
    config = yaml.safe_load(cm["data"][CONFIG])
    text = yaml.safe_dump(config)
    # Registry, offline data and staging in the bucket Terraform makes.
    assert config["registry"]["path"] == f"s3://{fs.bucket}/features/registry.db"
    assert config["offline_store"]["storage_path"].startswith(f"s3://{fs.bucket}/features/")
    assert text.count("s3://") == text.count(f"s3://{fs.bucket}/")
    online = config["online_store"]
    assert online["type"] == "postgres"
    # Its own database and role on the MLflow instance (Terraform's feature_store_db_name).
    assert (online["host"], int(online["port"]), online["database"], online["user"]) == (
        fs.database.host, fs.database.port, TF_DB_NAME, TF_DB_NAME)
    assert online["sslmode"] == "require"
    # The password is substituted from the pods' environment, never written down.
    assert online["password"] == "${RAYPLANE_FEAST_DB_PASSWORD}"  # pragma: allowlist secret


def test_the_login_comes_from_secrets_manager(objects, env):
    es = find(objects, "ExternalSecret", features.DB_SECRET)
    assert es["spec"]["secretStoreRef"] == {"kind": "ClusterSecretStore", "name": SECRET_STORE}
    assert es["spec"]["data"] == [{"secretKey": "password", "remoteRef": {  # pragma: allowlist secret
        "key": env.feature_store.database.secret, "property": "password"}}]
    # Below the prefix External Secrets' role may read (Terraform writes it there).
    assert env.feature_store.database.secret == f"{env.secrets_manager_prefix}/feast-db"


def test_feature_store_pods_get_the_account_yaml_login_and_egress(objects, env):
    sa = find(objects, "ServiceAccount", features.SERVICE_ACCOUNT)
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == \
        env.feature_store.role_arn
    assert sa["automountServiceAccountToken"] is False
    jobs = [find(objects, "RayCronJob", features.MATERIALIZE),
            find(objects, "RayJob", "job-duration")]
    for job in jobs:
        templates = ray_templates(job)
        assert len(templates) == 2, [w for w, _ in templates]  # head + one worker group
        for where, t in templates:
            assert t["spec"]["serviceAccountName"] == features.SERVICE_ACCOUNT, where
            assert t["metadata"]["labels"][features.POD_LABEL] == "true", where
            variables = env_of(t)
            assert variables[features.CONFIG_ENV] == f"{features.CONFIG_DIR}/{CONFIG}"
            assert variables["RAYPLANE_FEAST_DB_PASSWORD"] == {"secretKeyRef": {
                "name": features.DB_SECRET, "key": "password"}}
            mounts = t["spec"]["containers"][0]["volumeMounts"]
            assert {"name": "feature-store", "mountPath": features.CONFIG_DIR,
                    "readOnly": True} in mounts
        (submitter,) = [t for w, t in pod_templates(job) if w.endswith("submitterPodTemplate")]
        assert submitter["spec"]["serviceAccountName"] == "ray"  # no AWS access needed
    policy = find(objects, "NetworkPolicy", "allow-feature-store-egress")
    assert policy["spec"]["podSelector"] == {"matchLabels": {features.POD_LABEL: "true"}}
    assert policy["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": env.vpc_cidr}}],
                                         "ports": [{"protocol": "TCP", "port": 5432}]}]


def test_materialisation_is_a_raycronjob_on_the_cpu_pool(objects, env, catalog):
    cron = find(objects, "RayCronJob", features.MATERIALIZE)
    assert cron["spec"]["schedule"] == env.feature_store.materialize.schedule
    job = cron["spec"]["jobTemplate"]
    assert job["entrypoint"] == \
        "python -m features.jobs apply && python -m features.jobs materialize"
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    pool = catalog.pool("cpu")
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("cpu", 1, 1)
    spec = group["template"]["spec"]
    assert spec["nodeSelector"] == pool.node_selector
    assert spec["priorityClassName"] == "training"  # the namespace's default class
    assert "pool:cpu" in group["rayStartParams"]["resources"]


def test_the_tf_job_is_sized_like_the_pytorch_rayjob(objects, env, catalog):
    job = find(objects, "RayJob", "job-duration")
    assert job["spec"]["entrypoint"] == \
        "python -m train.duration --config train/configs/duration.yaml"
    cfg = load_duration_config(env.feature_store)
    assert (cfg.pool, cfg.num_workers) == ("a100-timeslice", 2)
    # The PyTorch RayJob of a config with the same pool and workers: the same worker group.
    torch_cfg = TrainConfig.load(REPO / "train" / "configs" / "demo.yaml").model_copy(
        update={"pool": cfg.pool, "num_workers": cfg.num_workers})
    torch_job = render_rayjob(catalog, env, RayJobSpec(config="x.yaml"), torch_cfg)
    (ours,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (theirs,) = torch_job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
        assert ours[key] == theirs[key], key
    assert ours["minReplicas"] == ours["maxReplicas"] == 2
    a, b = ours["template"]["spec"], theirs["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        assert a[key] == b[key], key
    assert a["containers"][0]["resources"] == b["containers"][0]["resources"]
    assert a["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert a["priorityClassName"] == "training"
    # The images with the tensorflow extra, on the head (the driver imports Keras) and workers.
    assert job["metadata"]["annotations"][features.IMAGE_EXTRAS] == "tensorflow"
    for where, t in ray_templates(job):
        image = t["spec"]["containers"][0]["image"]
        assert image.startswith(env.images.repository + ":") and image.endswith("-tf"), where


def test_the_agents_workers_read_the_store_for_job_estimate(objects, env):
    """job_estimate (agents/estimates.py) on EKS: in the agents app's namespace the account,
    yaml, login and egress exist; the workers (API replicas and MCP server) mount the yaml and
    carry the password; the head runs no replica and keeps `ray`; all run the -tf images (the
    model is Keras)."""
    (app,) = env.agents
    ns = app.namespace
    assert ns != env.feature_store.namespace
    assert features.store_namespaces(env) == [env.feature_store.namespace, ns]
    training_cm = find(objects, "ConfigMap", features.CONFIG_MAP)
    assert find(objects, "ConfigMap", features.CONFIG_MAP, ns)["data"] == training_cm["data"]
    es = find(objects, "ExternalSecret", features.DB_SECRET, ns)
    assert es["spec"] == find(objects, "ExternalSecret", features.DB_SECRET)["spec"]
    sa = find(objects, "ServiceAccount", features.SERVICE_ACCOUNT, ns)
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == \
        env.feature_store.role_arn
    policy = find(objects, "NetworkPolicy", "allow-feature-store-egress", ns)
    assert policy["spec"]["podSelector"] == {"matchLabels": {features.POD_LABEL: "true"}}
    assert policy["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": env.vpc_cidr}}],
                                         "ports": [{"protocol": "TCP", "port": 5432}]}]
    (service,) = [o for o in objects if o["kind"] == "RayService"
                  and o["metadata"]["namespace"] == ns]
    assert service["metadata"]["annotations"][features.IMAGE_EXTRAS] == "tensorflow"
    cluster = service["spec"]["rayClusterConfig"]
    workers = [g["template"] for g in cluster["workerGroupSpecs"]]
    assert workers
    for t in workers:
        assert t["spec"]["serviceAccountName"] == features.SERVICE_ACCOUNT
        assert t["metadata"]["labels"][features.POD_LABEL] == "true"
        variables = env_of(t)
        assert variables[features.CONFIG_ENV] == f"{features.CONFIG_DIR}/{CONFIG}"
        assert variables["RAYPLANE_FEAST_DB_PASSWORD"] == {"secretKeyRef": {
            "name": features.DB_SECRET, "key": "password"}}
        assert {"name": "feature-store", "mountPath": features.CONFIG_DIR,
                "readOnly": True} in t["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "feature-store", "configMap": {"name": features.CONFIG_MAP}} in \
            t["spec"]["volumes"]
    head = cluster["headGroupSpec"]["template"]
    assert head["spec"]["serviceAccountName"] == "ray"
    assert features.CONFIG_ENV not in env_of(head)
    for t in [head, *workers]:
        image = t["spec"]["containers"][0]["image"]
        assert image.startswith(env.images.repository + ":") and image.endswith("-tf")


def test_without_the_tf_job_the_agents_keep_their_images(catalog, env):
    bare = with_feature_store(env, training=None)
    (service,) = [o for o in render_objects(catalog, bare, load_inputs(bare, REPO))
                  if o["kind"] == "RayService" and o["metadata"]["namespace"] == "agentic"]
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"],
                 *(g["template"] for g in cluster["workerGroupSpecs"])]
    assert not any(t["spec"]["containers"][0]["image"].endswith("-tf") for t in templates)
    assert features.IMAGE_EXTRAS not in service["metadata"].get("annotations", {})
    # Still wired: the tool answers its own error where the model cannot load.
    assert all(features.CONFIG_ENV in env_of(t) for t in templates[1:])


def test_the_names_agree_with_terraform(objects, env):
    """What the environment names is what platform-services makes (its defaults)."""
    fs = env.feature_store
    tf = (PLATFORM_SERVICES / "feature-store.tf").read_text()
    variables = (PLATFORM_SERVICES / "variables.tf").read_text()
    assert fs.bucket == f"{env.cluster_name}-feast-{env.account_id}"
    assert '"${var.name}-feast-${local.account_id}"' in tf
    assert fs.role_arn == f"arn:aws:iam::{env.account_id}:role/{env.cluster_name}-feature-store"
    assert 'name               = "${var.name}-feature-store"' in tf
    trusted = re.search(r'variable "feature_store_service_accounts" \{.*?default\s+= (\[.*?\])',
                        variables, re.DOTALL)
    # The role trusts every rendered feature-store account (the jobs' and the agents').
    accounts = [f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in objects
                if o["kind"] == "ServiceAccount"
                and o["metadata"]["name"] == features.SERVICE_ACCOUNT]
    assert sorted(yaml.safe_load(trusted[1])) == sorted(accounts) == sorted(
        f"{ns}/{features.SERVICE_ACCOUNT}" for ns in features.store_namespaces(env))
    assert fs.database.secret == f"{env.secrets_manager_prefix}/feast-db"
    assert 'name                    = "${var.secrets_manager_prefix}/feast-db"' in tf
    # The online store's host is the MLflow instance the agents' threads live on too.
    assert fs.database.host == env.agents[0].database.host


def test_no_feature_store_renders_nothing(catalog, env):
    bare = env.model_copy(update={"feature_store": None})
    assert render_feature_store(catalog, bare, secret_store=SECRET_STORE,
                                mlflow_db=MLFLOW_DB) == []


def test_without_mlflows_master_login_the_database_cannot_be_made(catalog, env):
    with pytest.raises(SpecError, match="addons.mlflow_db_secret") as err:
        render_feature_store(catalog, env, secret_store=SECRET_STORE, mlflow_db=None,
                             config_yaml="")
    assert err.value.field == "feature_store.database"


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"namespace": "mlops"}, "feature_store.namespace", "'mlops' is not a Ray namespace"),
    ({"namespace": "nowhere"}, "feature_store.namespace", "nowhere"),
])
def test_bad_placement_is_named(catalog, env, change, field, message):
    with pytest.raises(SpecError, match=re.escape(message)) as err:
        render_feature_store(catalog, with_feature_store(env, **change),
                             secret_store=SECRET_STORE, mlflow_db=MLFLOW_DB, config_yaml="")
    assert err.value.field == field


def test_a_tf_job_larger_than_its_pool_is_refused_naming_num_workers(catalog, env):
    pool = catalog.pool("a100-timeslice")
    big = load_duration_config(env.feature_store).model_copy(
        update={"pool": pool.name, "num_workers": pool.max_workers + 1})
    with pytest.raises(SpecError, match="num_workers") as err:
        features.render_duration_job(catalog, env, env.feature_store, big)
    assert err.value.field.endswith(".num_workers")
    assert f"holds at most {pool.max_workers}" in str(err.value)


@pytest.mark.parametrize(("change", "expected"), [
    ({"bucket": "s3://x"}, "feature_store.bucket"),
    ({"role_arn": "rayplane-feature-store"}, "feature_store.role_arn"),
    ({"database": {"host": "h"}}, "feature_store.database.secret"),
])
def test_bad_settings_are_named(env, change, expected):
    data = copy.deepcopy(env.model_dump(mode="json"))
    data["feature_store"].update(change)
    with pytest.raises(SpecError, match=re.escape(expected)):
        Environment.parse(data)


def test_the_database_and_role_are_made_by_a_sync_hook_job(objects, env):
    """RDS makes one database; the Job makes Feast's with MLflow's master login, on every sync
    (a hook replaced each time), reading both logins as files."""
    job = find(objects, "Job", features_db.BOOTSTRAP, namespace="mlops")
    annotations = job["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/hook"] == "Sync"
    assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
    # After every ExternalSecret of the platform Application.
    assert int(annotations["argocd.argoproj.io/sync-wave"]) == KIND_ORDER.index("Job") > \
        KIND_ORDER.index("ExternalSecret")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-c", features_db.SCRIPT]
    assert container["image"] == env.images.image(gpu=False)
    variables = env_of(job["spec"]["template"])
    assert variables["DB_HOST"] == env.feature_store.database.host
    assert variables["FEAST_DB"] == STORE_DATABASE == TF_DB_NAME
    assert not [e for e in container["env"] if "valueFrom" in e]  # secrets as files only
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"mlflow-db", features.DB_SECRET}
    for name in secrets:  # both rendered in mlops
        find(objects, "ExternalSecret", name, namespace="mlops")
    assert pod["automountServiceAccountToken"] is False
    egress = find(objects, "NetworkPolicy", "allow-feast-db-bootstrap", namespace="mlops")
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in egress["spec"]["podSelector"]["matchLabels"].items())
    assert egress["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]
