"""Serving in production (issue 15, findings 2 and 7, and the load balancer path): GCS fault
tolerance speaks TLS to ElastiCache and verifies it; RayServices upgrade incrementally through
a Gateway where the cluster has the Gateway API and blue-green otherwise; the OpenAI and
agents endpoints sit behind an internal NLB with TLS; GPU pods cache compiled kernels on
writable storage. Every new object validates against its schema."""

from __future__ import annotations

import copy
import ssl
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raycluster.environments import Environment, RayServiceSpec
from raycluster.kuberay.serving import (
    GATEWAY_LISTENER,
    GATEWAY_NAME_LABEL,
    REDIS_CA_CONFIGMAP,
    gateway_service_name,
)
from raycluster.render import load_inputs, render_objects
from raycluster.spec import SpecError
from tests.support.crds import strict as _strict

REPO = Path(__file__).resolve().parents[3]
LB = "service.beta.kubernetes.io/aws-load-balancer-"
INCREMENTAL = "NewClusterWithIncrementalUpgrade"


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


def env_with(env: Environment, **changes) -> Environment:
    data = env.model_dump(mode="json", exclude_none=True)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return Environment.parse(data)


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def rayservices(objects):
    return {o["metadata"]["name"]: o for o in by_kind(objects, "RayService")}


def crd_validator(schemas_dir: Path, rel: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((schemas_dir / rel).read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def assert_valid_core(obj: dict, env: Environment) -> None:
    try:
        kubernetes_validate.validate(obj, env.kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: "
                    f"{'.'.join(map(str, err.path))}: {err.message}")


def env_vars(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container["env"]}


def writable_dir(pod: dict, container: dict, path: str) -> bool:
    """``path`` lies under a writable mount of an emptyDir (the root filesystem is not)."""
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    return any(m["name"] in empty and not m.get("readOnly")
               and PurePosixPath(path).is_relative_to(m["mountPath"])
               for m in container["volumeMounts"])


# -- finding 2: GCS fault tolerance over TLS -------------------------------------------------


def heads_with_gcs_ft(objects):
    for obj in objects:
        spec = obj.get("spec") or {}
        for cluster in (spec.get("rayClusterConfig"), spec.get("rayClusterSpec"),
                        spec.get("jobTemplate", {}).get("rayClusterSpec"),
                        spec if obj["kind"] == "RayCluster" else None):
            if cluster and "gcsFaultToleranceOptions" in cluster:
                yield obj, cluster


def test_every_head_with_gcs_fault_tolerance_verifies_the_redis_certificate(objects, env):
    seen = 0
    maps = {o["metadata"]["namespace"]: o for o in by_kind(objects, "ConfigMap")
            if o["metadata"]["name"] == REDIS_CA_CONFIGMAP}
    for obj, cluster in heads_with_gcs_ft(objects):
        seen += 1
        address = cluster["gcsFaultToleranceOptions"]["redisAddress"]
        assert address.startswith("rediss://"), address  # ElastiCache accepts TLS only
        pod = cluster["headGroupSpec"]["template"]["spec"]
        head = pod["containers"][0]
        values = env_vars(head)
        # Without it Ray's GCS fails the handshake with CERTIFICATE_VERIFY_FAILED.
        ca_path = PurePosixPath(values["RAY_REDIS_CA_CERT"])
        assert values["RAY_REDIS_SERVER_NAME"] == address.removeprefix("rediss://").rsplit(
            ":", 1)[0]
        mount = next(m for m in head["volumeMounts"]
                     if ca_path.parent == PurePosixPath(m["mountPath"]))
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]
        assert volume["name"] == REDIS_CA_CONFIGMAP
        key = next(i["key"] for i in volume["items"] if i["path"] == ca_path.name)
        ns = obj["metadata"]["namespace"]
        assert ns in maps, f"{obj['kind']}/{obj['metadata']['name']}: no {volume['name']} in {ns}"
        bundle = maps[ns]["data"][key]
        # The bundle loads as Ray's TLS client loads it and holds Amazon's roots.
        context = ssl.create_default_context(cadata=bundle)
        subjects = {dict(x[0] for x in c["subject"])["commonName"]
                    for c in context.get_ca_certs()}
        assert "Amazon Root CA 1" in subjects
    assert seen >= 2, "the OpenAI and agents RayServices run with GCS fault tolerance"
    for cm in maps.values():
        assert_valid_core(cm, env)


def test_a_rediss_address_without_a_ca_bundle_is_refused_naming_the_field(env):
    with pytest.raises(SpecError) as err:
        env_with(env, redis_ca_bundle=None)
    assert err.value.field == "redis_ca_bundle"
    assert "rediss://" in str(err.value)


def test_a_plain_redis_address_is_refused_naming_the_field(env):
    with pytest.raises(SpecError) as err:
        env_with(env, redis_address="redis://gcs.abc123.cache.amazonaws.com:6379")
    assert err.value.field == "redis_address"
    assert "TLS only" in str(err.value)


def test_a_ca_bundle_that_is_not_there_is_refused_naming_the_field(catalog, env):
    broken = env_with(env, redis_ca_bundle="raycluster/kuberay/no-such-bundle.pem")
    with pytest.raises(SpecError) as err:
        render_objects(catalog, broken, load_inputs(broken, REPO))
    assert err.value.field == "redis_ca_bundle"


# -- finding 7: upgrades ----------------------------------------------------------------------


def test_rayservices_upgrade_incrementally_through_a_gateway(objects, env, schemas_dir):
    gateways = {(o["metadata"]["namespace"], o["metadata"]["name"]): o
                for o in by_kind(objects, "Gateway")}
    validate = crd_validator(schemas_dir, "gateway-api-v1.6.1/"
                                          "gateway.networking.k8s.io_gateways.yaml")
    services = rayservices(objects)
    assert {"openai", "agents"} <= set(services)
    for name, obj in services.items():
        strategy = obj["spec"]["upgradeStrategy"]
        # Not NewCluster: that moves all traffic at once to a cluster started at its minimum.
        assert strategy["type"] == INCREMENTAL, name
        options = strategy["clusterUpgradeOptions"]
        # What KubeRay's ValidateClusterUpgradeOptions demands.
        assert obj["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
        assert 0 < options["stepSizePercent"] <= options["maxSurgePercent"] <= 100
        assert options["intervalSeconds"] > 0
        assert options["gatewayClassName"] == env.serving.gateway_class
        # One worker pod's share at a time (KubeRay's advice): the new cluster never needs
        # more than one extra GPU worker.
        groups = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        gpu = [g for g in groups if any(k.startswith("nvidia.com/") for k in g["template"][
            "spec"]["containers"][0]["resources"]["limits"])] or groups
        pods = sum(g["maxReplicas"] for g in gpu)
        assert (options["maxSurgePercent"] - 1) * pods < 100 <= options["maxSurgePercent"] * pods
        # The Gateway KubeRay routes the upgrade through, as KubeRay builds it: KubeRay finds
        # it equal (class and listeners) and never rewrites it.
        ns = obj["metadata"]["namespace"]
        gateway = gateways[(ns, f"{name}-gateway")]
        assert gateway["spec"]["gatewayClassName"] == options["gatewayClassName"]
        assert [{k: lis[k] for k in ("name", "protocol", "port")}
                for lis in gateway["spec"]["listeners"]] == [GATEWAY_LISTENER]
        errors = list(validate.iter_errors(gateway))
        assert not errors, [e.message for e in errors[:3]]
    # KubeRay owns <name>-httproute and moves its weights during an upgrade: rendered, Argo
    # CD would reset them.
    assert not by_kind(objects, "HTTPRoute")


def test_without_the_gateway_api_upgrades_are_blue_green(catalog, env, schemas_dir):
    no_gateway = env_with(env, serving={**env.serving.model_dump(mode="json"),
                                        "gateway_class": None})
    objects = render_objects(catalog, no_gateway, load_inputs(no_gateway, REPO))
    assert not by_kind(objects, "Gateway")
    validate = crd_validator(schemas_dir, "kuberay-v1.7.0/ray.io_rayservices.yaml")
    for name, obj in rayservices(objects).items():
        assert obj["spec"]["upgradeStrategy"] == {"type": "NewCluster"}, name
        errors = list(validate.iter_errors(obj))
        assert not errors, [e.message for e in errors[:3]]


def test_an_incremental_upgrade_without_a_gateway_class_is_refused(catalog, env):
    from raycluster.render import render_service

    no_gateway = env_with(env, serving={**env.serving.model_dump(mode="json"),
                                        "gateway_class": None})
    svc = RayServiceSpec.parse({"config": "serve/configs/eks-vllm.yaml",
                                "upgrade_strategy": INCREMENTAL})
    cfg = load_inputs(env, REPO).serve[svc.config]
    with pytest.raises(SpecError) as err:
        render_service(catalog, no_gateway, svc, cfg, field="services[0]")
    assert err.value.field == "services[0].upgrade_strategy"
    assert "serving.gateway_class" in str(err.value)


# -- the internal load balancer with TLS -------------------------------------------------------


def assert_internal_tls_nlb(service: dict, env: Environment, port: int) -> None:
    annotations = service["metadata"]["annotations"]
    spec = service["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["loadBalancerClass"] == "service.k8s.aws/nlb"  # AWS LBC, not the in-tree CLB
    assert annotations[f"{LB}scheme"] == "internal"
    assert annotations[f"{LB}ssl-cert"] == env.serving.certificate_arn
    assert annotations[f"{LB}ssl-ports"] == str(port)
    assert annotations[f"{LB}ssl-negotiation-policy"].startswith("ELBSecurityPolicy-TLS13")
    # Every listener is the TLS one: no plain-text port beside it.
    assert [p["port"] for p in spec["ports"]] == [port]
    assert spec["loadBalancerSourceRanges"] == (env.ingress_cidrs or [env.vpc_cidr])


def test_the_openai_and_agents_endpoints_sit_behind_an_internal_tls_load_balancer(objects, env):
    services = {(o["metadata"]["namespace"], o["metadata"]["name"]): o
                for o in by_kind(objects, "Service")}
    for name, obj in rayservices(objects).items():
        ns = obj["metadata"]["namespace"]
        tls = services[(ns, f"{name}-tls")]
        assert_internal_tls_nlb(tls, env, 443)
        # In front of the Gateway's proxy, which KubeRay's HTTPRoute splits between clusters.
        assert tls["spec"]["selector"] == {GATEWAY_NAME_LABEL: f"{name}-gateway"}
        assert tls["spec"]["ports"][0]["targetPort"] == GATEWAY_LISTENER["port"]
        assert_valid_core(tls, env)
        # In-cluster clients reach the Gateway too, on the Serve port (KubeRay names the Serve
        # Services after each cluster during incremental upgrades: no <name>-serve-svc).
        inside = services[(ns, gateway_service_name(name))]
        assert inside["spec"]["type"] == "ClusterIP"
        assert inside["spec"]["selector"] == tls["spec"]["selector"]
        assert_valid_core(inside, env)


def test_the_agents_reach_the_model_through_a_service_that_exists(objects):
    """The agents' model endpoint (agents/configs/eks.yaml model.base_url) names a Service
    that is there: rendered, or made by KubeRay (<name>-serve-svc, NewCluster only)."""
    from urllib.parse import urlsplit

    from agents.spec import AgentsAppConfig

    cfg = AgentsAppConfig.from_file(REPO / "agents" / "configs" / "eks.yaml")
    host = urlsplit(cfg.model.base_url)
    name, ns = host.hostname.split(".")[:2]
    rendered = {(o["metadata"]["namespace"], o["metadata"]["name"])
                for o in by_kind(objects, "Service")}
    by_kuberay = {(o["metadata"]["namespace"], f"{o['metadata']['name']}-serve-svc")
                  for o in rayservices(objects).values()
                  if o["spec"]["upgradeStrategy"]["type"] != INCREMENTAL}
    assert (ns, name) in rendered | by_kuberay, f"{cfg.model.base_url}: no such Service"


def test_without_the_gateway_api_the_serve_service_is_the_tls_load_balancer(catalog, env):
    no_gateway = env_with(env, serving={**env.serving.model_dump(mode="json"),
                                        "gateway_class": None})
    objects = render_objects(catalog, no_gateway, load_inputs(no_gateway, REPO))
    assert not [o for o in by_kind(objects, "Service") if o["metadata"]["name"].endswith("-tls")]
    for name, obj in rayservices(objects).items():
        # KubeRay keeps the selector of <name>-serve-svc on the active cluster's Serve pods.
        template = copy.deepcopy(obj["spec"]["serveService"])
        service = {"apiVersion": "v1", "kind": "Service", **template,
                   "metadata": {"name": f"{name}-serve-svc", **template["metadata"]}}
        port = service["spec"]["ports"][0]
        assert port["name"] == "serve"  # KubeRay keeps only ports named serve
        assert_internal_tls_nlb(service, no_gateway, port["port"])
        assert_valid_core(service, no_gateway)


# -- finding 7: vLLM and Triton on a read-only root filesystem ---------------------------------


CACHE_VARS = ("TRITON_CACHE_DIR", "CUDA_CACHE_PATH", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR",
              "HF_HOME", "XDG_CACHE_HOME")


def gpu_worker_pods(objects):
    for obj in objects:
        spec = obj.get("spec") or {}
        for cluster in (spec.get("rayClusterConfig"), spec.get("rayClusterSpec"),
                        spec.get("jobTemplate", {}).get("rayClusterSpec"),
                        spec if obj["kind"] == "RayCluster" else None):
            for group in (cluster or {}).get("workerGroupSpecs", []):
                pod = group["template"]["spec"]
                limits = pod["containers"][0]["resources"]["limits"]
                if any(k.startswith("nvidia.com/") for k in limits):
                    yield f"{obj['kind']}/{obj['metadata']['name']}/{group['groupName']}", pod


def test_gpu_workers_cache_kernels_and_models_on_writable_storage(objects):
    pods = dict(gpu_worker_pods(objects))
    assert any(name.startswith("RayService/openai/") for name in pods), "the vLLM workers"
    for name, pod in pods.items():
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        values = env_vars(container)
        for var in CACHE_VARS:
            # Triton's default (~/.triton/cache) and CUDA's (~/.nv) are on the read-only root.
            assert values.get(var), f"{name}: {var} unset"
            assert writable_dir(pod, container, values[var]), f"{name}: {var}={values[var]}"
