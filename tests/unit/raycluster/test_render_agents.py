"""The agents app on EKS: a RayService in the agentic namespace (replacing the bare `agents`
RayCluster) whose serveConfigV2 is the same Serve config `rayplane agents up` deploys, whose
pods take critical-agents priority on the CPU pool and on the MIG pool, and whose replicas read
their DSN (the RDS database Terraform creates), model key, API keys and Ray token from Secrets
that External Secrets fills. Checked against KubeRay's CRD; bad input names the field."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from agents.serve_app import serve_config
from agents.spec import AgentsAppConfig
from raycluster.environments import AgentsServiceSpec, ClusterSpec
from raycluster.kuberay.agents import render_agents_service
from raycluster.render import load_inputs, render_objects
from raycluster.spec import SpecError

REPO = Path(__file__).resolve().parents[3]
EKS_AGENTS = REPO / "agents" / "configs" / "eks.yaml"


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


@pytest.fixture(scope="module")
def eks_cfg() -> AgentsAppConfig:
    return AgentsAppConfig.from_file(EKS_AGENTS)


@pytest.fixture(scope="module")
def rayservice_validator(schemas_dir):
    crd = yaml.load((schemas_dir / "kuberay-v1.7.0" / "ray.io_rayservices.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def find(objects, kind, name, namespace="agentic"):
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
              and o["metadata"].get("namespace") == namespace]
    return obj


def env_of(template) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in
            template["spec"]["containers"][0]["env"]}


def test_the_rayservice_replaces_the_bare_cluster(objects, catalog, eks_cfg):
    assert not [o for o in objects if o["kind"] == "RayCluster"
                and o["metadata"]["namespace"] == "agentic"]
    svc = find(objects, "RayService", "agents")
    # The same Serve config as a local deploy, bound for every pod, the dashboard at the
    # RayService's own head Service for the platform tools.
    expected = serve_config(eks_cfg, catalog, host="0.0.0.0", port=8000, env_vars={
        "RAY_ADDRESS": "http://agents-head-svc.agentic.svc.cluster.local:8265"})
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == expected
    assert AgentsAppConfig.model_validate(expected["applications"][0]["args"]) == eks_cfg


def test_the_head_is_on_the_cpu_pool_and_workers_hold_the_replicas(objects):
    cluster = find(objects, "RayService", "agents")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["nodeSelector"] == {"rayplane.io/pool": "cpu"}
    assert head["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["template"]["spec"]["nodeSelector"] == {"rayplane.io/pool": "cpu"}
    # eks.yaml: 2..8 replicas of 1 core and the MCP server's 0.1, on 4-core workers.
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3)
    for template in (head["template"], group["template"]):
        assert template["spec"]["priorityClassName"] == "critical-agents"
    assert cluster["authOptions"] == {"mode": "token", "secretName": "rayplane-ray-auth"}
    assert "gcsFaultToleranceOptions" in cluster


def test_replicas_read_their_secrets_from_external_secrets(objects, env):
    cluster = find(objects, "RayService", "agents")["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]["template"]
    wired = env_of(worker)
    assert wired["RAYPLANE_AGENTS_DSN"] == {"secretKeyRef": {"name": "rayplane-agents-db",
                                                             "key": "dsn"}}
    assert wired["RAYPLANE_MODEL_API_KEY"] == {"secretKeyRef": {
        "name": "rayplane-agents-model-key", "key": "api_key"}}
    assert wired["RAYPLANE_API_KEYS"] == {"secretKeyRef": {"name": "rayplane-serve-api-keys",
                                                           "key": "keys"}}
    assert wired["RAY_AUTH_TOKEN_PATH"] == "/var/run/secrets/ray/auth_token"
    (token,) = [v for v in worker["spec"]["volumes"] if v["name"] == "ray-token"]
    assert token["secret"]["secretName"] == "rayplane-ray-auth"
    # The head runs no replica and gets none of them.
    assert not {"RAYPLANE_AGENTS_DSN", "RAYPLANE_API_KEYS"} & set(
        env_of(cluster["headGroupSpec"]["template"]))
    # Every one of those Secrets is rendered in the namespace.
    for name in ("rayplane-agents-db", "rayplane-agents-model-key", "rayplane-serve-api-keys"):
        assert find(objects, "ExternalSecret", name)["spec"]["target"]["name"] == name
    model_key = find(objects, "ExternalSecret", "rayplane-agents-model-key")
    assert model_key["spec"]["data"][0]["remoteRef"]["key"] == \
        "rayplane/production/agentic/model-api-key"


def test_the_dsn_is_composed_from_the_password_rds_manages(objects, env):
    db = env.agents[0].database
    es = find(objects, "ExternalSecret", "rayplane-agents-db")
    assert {(d["secretKey"], d["remoteRef"]["key"], d["remoteRef"]["property"])
            for d in es["spec"]["data"]} == {("username", db.secret, "username"),
                                             ("password", db.secret, "password")}
    dsn = es["spec"]["target"]["template"]["data"]["dsn"]
    assert dsn == ("postgresql://{{ .username | urlquery }}:{{ .password | urlquery }}@"
                   f"{db.host}:5432/mlflow?sslmode=require")
    egress = find(objects, "NetworkPolicy", "allow-postgres-egress")
    assert egress["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": env.vpc_cidr}}],
                                         "ports": [{"protocol": "TCP", "port": 5432}]}]


def test_without_dsn_env_the_dsn_is_a_mounted_file(catalog, env, eks_cfg):
    cfg = eks_cfg.model_copy(update={"checkpointer": eks_cfg.checkpointer.model_copy(
        update={"dsn_env": None})})
    svc = render_agents_service(catalog, env, env.agents[0], cfg)
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    assert env_of(worker)["RAYPLANE_POSTGRES_DSN_FILE"] == "/var/run/secrets/rayplane/agents-db/dsn"
    (vol,) = [v for v in worker["spec"]["volumes"] if v["name"] == "agents-db"]
    assert vol["secret"] == {"secretName": "rayplane-agents-db", "defaultMode": 0o440,
                             "items": [{"key": "dsn", "path": "dsn"}]}


def test_critical_agents_on_the_mig_pool(catalog, env, eks_cfg, rayservice_validator):
    cfg = eks_cfg.model_copy(update={"pool": "a100-mig"})
    svc = render_agents_service(catalog, env, env.agents[0], cfg)
    errors = list(rayservice_validator.iter_errors(svc))
    assert not errors, errors[0].message
    cluster = svc["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"a100-mig", "cpu"}  # the API on MIG, the MCP server on cpu
    mig = groups["a100-mig"]
    assert (mig["minReplicas"], mig["maxReplicas"]) == (2, 8)
    limits = mig["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-3g.40gb"] == "1"
    assert (groups["cpu"]["minReplicas"], groups["cpu"]["maxReplicas"]) == (1, 1)
    for template in [cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in groups.values())]:
        assert template["spec"]["priorityClassName"] == "critical-agents"
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["deployments"][0]["ray_actor_options"] == {
        "num_cpus": 0, "resources": {"pool:a100-mig": 1.0}}


@pytest.mark.parametrize(("update", "message"), [
    ({"pool": "a100mig"}, "agents.config(agents/configs/eks.yaml): pool: 'a100mig' is not a "
                          "pool (did you mean 'a100-mig'?)"),
    ({"model": {"base_url": None}}, "agents.config(agents/configs/eks.yaml).model.base_url: "
                                    "required on Kubernetes"),
    # 200 replicas of 1 core (and the MCP server's 0.1) on 4-core workers: more than the
    # pool's 10 nodes hold (its workers per node after kube-reserved and the DaemonSets,
    # raycluster/capacity.py).
    ({"autoscaling": {"max_replicas": 200}}, "agents.config(agents/configs/eks.yaml)."
                                             "autoscaling.max_replicas: the agents app needs "
                                             "up to 51 workers of pool 'cpu', which holds "),
])
def test_bad_input_is_one_line_naming_the_field(catalog, env, eks_cfg, update, message):
    doc = eks_cfg.model_dump(mode="json", exclude_unset=True)
    for key, value in update.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and key in doc else value
    cfg = AgentsAppConfig.parse(doc)
    with pytest.raises(SpecError) as err:
        render_agents_service(catalog, env, env.agents[0], cfg)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_the_old_cluster_beside_the_service_is_refused(catalog, env):
    both = copy.deepcopy(env)
    both.clusters.append(ClusterSpec.parse({"name": "agents", "namespace": "agentic",
                                            "worker_groups": [{"pool": "cpu"}]}))
    with pytest.raises(SpecError, match=r"^agents\[0\]\.name: 'agents' is also clusters\[2\]"):
        render_objects(catalog, both, load_inputs(both, REPO))


def test_two_agents_apps_of_a_namespace_share_one_database(catalog, env):
    other = copy.deepcopy(env)
    second = AgentsServiceSpec.parse({**env.agents[0].model_dump(), "name": "agents-b",
                                      "database": {**env.agents[0].database.model_dump(),
                                                   "host": "elsewhere.example.com"}})
    other.agents.append(second)
    with pytest.raises(SpecError, match=r"^agents\[1\]\.database: another agents app"):
        render_objects(catalog, other, load_inputs(other, REPO))
