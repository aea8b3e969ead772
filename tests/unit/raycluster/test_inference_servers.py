"""Triton and TGI on EKS (issue 18, build items 1 and 3): the production environment's mixed
serve config (serve/configs/eks-mixed.yaml) renders NVIDIA's Triton container and Hugging Face
TGI as Deployments + Services on the MIG pool, pinned, sized by the pool's sharing, under the
`restricted` Pod Security Standard, scraped by Prometheus and reachable only from the Serve
pods of their RayService; the Serve replicas find them at the address the serve config gives.
Every object validates against its schema; a spec that could never run is one line naming
the field."""

from __future__ import annotations

import copy
import re
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raycluster.environments import Environment
from raycluster.kuberay.inference_servers import (
    TGI_IMAGE,
    TRITON_IMAGE,
    tgi_max_batch_total_tokens,
)
from raycluster.render import file_name, load_inputs, render_objects
from raycluster.spec import SpecError
from serve.config import ServeAppConfig
from tests.support.crds import strict

REPO = Path(__file__).resolve().parents[3]
MIXED = "serve/configs/eks-mixed.yaml"
MIG = "nvidia.com/mig-3g.40gb"
APP = "openai-mixed"  # its RayService


@pytest.fixture(scope="module")
def objects(catalog, env):
    return render_objects(catalog, env, load_inputs(env, REPO))


@pytest.fixture(scope="module")
def mixed() -> ServeAppConfig:
    return ServeAppConfig.from_file(REPO / MIXED)


def get(objects, kind, name, namespace="inference"):
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
             and o["metadata"].get("namespace") == namespace]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} rendered"
    return found[0]


def model(cfg: ServeAppConfig, engine: str):
    return next(m for m in cfg.models if m.engine.value == engine)


def render_with(catalog, env: Environment, mutate) -> list[dict]:
    """The production render with the mixed serve config changed by ``mutate(doc)``."""
    inputs = load_inputs(env, REPO)
    doc = yaml.safe_load((REPO / MIXED).read_text())
    mutate(doc)
    inputs.serve[MIXED] = ServeAppConfig.model_validate(doc)
    return render_objects(catalog, env, inputs)


def one_line_error(catalog, env, mutate, field: str) -> str:
    with pytest.raises(SpecError) as err:
        render_with(catalog, env, mutate)
    msg = str(err.value)
    assert "\n" not in msg and field in msg, msg
    return msg


# -- what runs, and where ------------------------------------------------------------------


def test_the_mixed_service_renders_one_triton_and_one_tgi_server(objects, env):
    assert any(s.config == MIXED and s.namespace == "inference" for s in env.services)
    servers = [o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"]
    assert sorted(servers) == ["tgi-mistral-7b-instruct", "triton-qwen2-5-7b-instruct"]


def test_images_are_pinned_releases(objects):
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-vllm-python-py3",
                        TRITON_IMAGE)
    assert re.fullmatch(r"ghcr\.io/huggingface/text-generation-inference:\d+\.\d+\.\d+",
                        TGI_IMAGE)
    images = {c["name"]: c["image"] for o in objects if o["kind"] == "Deployment"
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {"triton": TRITON_IMAGE, "tgi": TGI_IMAGE}


@pytest.mark.parametrize("name", ["triton-qwen2-5-7b-instruct", "tgi-mistral-7b-instruct"])
def test_a_server_runs_on_its_pool_as_a_ray_worker_of_that_pool_would(objects, catalog, name):
    pool = catalog.pool("a100-mig")
    pod = get(objects, "Deployment", name)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == pool.node_selector
    assert pod["tolerations"] == [t.toleration() for t in pool.taints]
    assert pod["priorityClassName"] == "production-inference"
    (server,) = pod["containers"]
    want = {"cpu": str(pool.worker.cpus), "memory": f"{pool.worker.memory_gib}Gi", MIG: "1"}
    assert server["resources"] == {"requests": want, "limits": want}
    # The RayService's MIG workers are the same shape: the same node holds either.
    rs = get(objects, "RayService", "openai")["spec"]["rayClusterConfig"]
    worker = rs["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == pod["nodeSelector"]
    assert worker["containers"][0]["resources"] == server["resources"]


def test_the_serve_replicas_of_servers_elsewhere_take_no_gpu_unit(objects, mixed):
    """The Triton and TGI models' replicas are clients: beside the ingress on the cpu pool,
    so the mixed RayService has no MIG worker group and each Serve deployment's pool has one."""
    rs = get(objects, "RayService", APP)["spec"]
    groups = {g["groupName"] for g in rs["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups == {"cpu"}
    app = yaml.safe_load(rs["serveConfigV2"])["applications"][0]
    for dep in app["deployments"]:
        pools = {r.removeprefix("pool:") for r in dep["ray_actor_options"]["resources"]}
        assert pools <= groups, f"{dep['name']} asks {pools}, the cluster has {groups}"


def test_the_inference_quota_holds_every_mig_unit_at_max_replicas_and_a_rollout(objects):
    quota = get(objects, "ResourceQuota", "rayplane-quota")["spec"]["hard"]
    units = 0
    for rs in (o for o in objects if o["kind"] == "RayService"
               and o["metadata"]["namespace"] == "inference"):
        for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            units += g["maxReplicas"] * int(limits.get(MIG, 0))
    for dep in (o for o in objects if o["kind"] == "Deployment"):
        surge = dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        limits = dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        units += (dep["spec"]["replicas"] + surge) * int(limits[MIG])
    assert units == 4 + 2 * 2  # the vLLM app's 4 workers; each server and its rollout's pod
    assert units <= int(quota[f"requests.{MIG}"])


# -- sizing --------------------------------------------------------------------------------


def args_of(container: dict) -> dict[str, str]:
    args = container["args"]
    return {a: b for a, b in zip(args, args[1:], strict=False) if a.startswith("--")}


def test_tgi_max_batch_total_tokens_is_the_mig_units_memory_over_the_kv_cache_per_token(
        objects):
    """Mistral-7B-Instruct-v0.3 (bf16) on a 3g.40gb unit: (40 GB x 0.9 - 7.25 B x 2 bytes)
    over 2 (K and V) x 32 layers x 8 KV heads x 128 x 2 bytes = 131072 bytes per token."""
    (tgi,) = get(objects, "Deployment", "tgi-mistral-7b-instruct")["spec"]["template"][
        "spec"]["containers"]
    args = args_of(tgi)
    tokens = (40 * 0.9 - 7.25 * 2) * 1e9 / (2 * 32 * 8 * 128 * 2)
    assert 164031 < tokens < 164032
    assert args["--max-batch-total-tokens"] == "164031"
    assert args["--cuda-memory-fraction"] == "0.9"  # MIG: 0.9 of the instance
    assert (args["--max-input-tokens"], args["--max-total-tokens"]) == ("8191", "8192")
    assert int(args["--max-input-tokens"]) <= int(args["--max-batch-prefill-tokens"]) \
        <= int(args["--max-batch-total-tokens"])
    assert args["--model-id"] == "/weights/model"


def test_on_a_time_sliced_gpu_tgi_gets_its_share_only(catalog, mixed):
    """Three pods share an A100 40GB (p4d) with no isolation: each sees the whole 40 GB and
    may take 0.9 / 3 of it (as vLLM's gpu_memory_utilization there): 12 GB, less 3 GB of
    weights, over 128 KiB per token."""
    m = model(mixed, "openai-upstream").model_copy(deep=True)
    assert m.upstream is not None and m.upstream.model_shape is not None
    m.upstream.model_shape.parameters_b = 1.5
    pool = catalog.pool("a100-timeslice")
    assert (pool.memory_per_unit_gb, pool.sharing.replicas) == (40 / 3, 3)
    tokens = tgi_max_batch_total_tokens(pool, m, "models[2]")
    assert tokens == 68664  # (40 x 0.3 - 1.5 x 2) x 1e9 / 131072 = 68664.55


def test_triton_gets_vllms_engine_arguments_from_the_pools_sharing(objects, mixed):
    repo = get(objects, "ConfigMap", "triton-qwen2-5-7b-instruct-repository")["data"]
    assert 'backend: "vllm"' in repo["config.pbtxt"]
    assert "decoupled: true" in repo["config.pbtxt"]
    assert re.search(r'^name: "llm"$', repo["config.pbtxt"], re.MULTILINE)
    engine = yaml.safe_load(repo["model.json"])
    assert engine == {"model": "/weights/model", "gpu_memory_utilization": 0.9,
                      "max_num_seqs": 256, "tensor_parallel_size": 1, "max_model_len": 8192}
    # The repository is mounted as <model_name>/config.pbtxt and <model_name>/1/model.json.
    pod = get(objects, "Deployment", "triton-qwen2-5-7b-instruct")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)["configMap"]
    assert {i["path"] for i in volume["items"]} == {"llm/config.pbtxt", "llm/1/model.json"}
    assert "--model-repository=/models" in pod["containers"][0]["args"]


def test_weights_come_from_the_models_source_before_the_server_starts(objects, mixed, env):
    for name, m in (("triton-qwen2-5-7b-instruct", model(mixed, "triton")),
                    ("tgi-mistral-7b-instruct", model(mixed, "openai-upstream"))):
        pod = get(objects, "Deployment", name)["spec"]["template"]["spec"]
        (fetch,) = pod["initContainers"]
        assert fetch["image"] == env.images.image(gpu=False)
        assert fetch["command"][-3:] == [m.source, "/weights", "/weights/model"]
        assert pod["serviceAccountName"] == "ray"  # IRSA: the S3 role of the namespace


# -- pod security --------------------------------------------------------------------------


def writable(pod: dict, container: dict, path: str) -> bool:
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    return any(m["name"] in empty and not m.get("readOnly")
               and PurePosixPath(path).is_relative_to(m["mountPath"])
               for m in container["volumeMounts"])


@pytest.mark.parametrize("name,paths", [
    ("triton-qwen2-5-7b-instruct", ["/tmp", "/dev/shm", "/weights/model", "/cache/vllm"]),
    ("tgi-mistral-7b-instruct", ["/tmp", "/data", "/dev/shm", "/weights/model"])])
def test_servers_meet_restricted_with_emptydirs_where_they_write(objects, name, paths):
    pod = get(objects, "Deployment", name)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["initContainers"] + pod["containers"]:
        sc = c["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"]
        assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
    server = pod["containers"][0]
    for path in paths:
        assert writable(pod, server, path), f"{name}: {path} is not on an emptyDir"
    env = {e["name"]: e["value"] for e in server["env"]}
    for var in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert writable(pod, server, env[var]), f"{name}: {var}={env[var]}"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["medium"] == "Memory"


def test_readiness_is_the_servers_own_health(objects):
    for name, path in (("triton-qwen2-5-7b-instruct", "/v2/health/ready"),
                       ("tgi-mistral-7b-instruct", "/health")):
        (c,) = get(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == path
        assert c["startupProbe"]["httpGet"]["path"] == path  # weights load for minutes


def test_every_server_object_validates_against_its_schema(objects, env, schemas_dir):
    crd = yaml.safe_load((schemas_dir / "prometheus-operator-v0.93.0/"
                          "monitoring.coreos.com_servicemonitors.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    monitor = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    role = "inference-server"
    mine = [o for o in objects if o["metadata"].get("labels", {}).get("rayplane.io/role") == role]
    assert sorted({o["kind"] for o in mine}) == ["ConfigMap", "Deployment", "NetworkPolicy",
                                                  "Service", "ServiceMonitor"]
    for obj in mine:
        if obj["kind"] == "ServiceMonitor":
            errors = [e.message for e in monitor.iter_errors(obj)]
            assert errors == [], f"ServiceMonitor/{obj['metadata']['name']}: {errors}"
            continue
        try:
            kubernetes_validate.validate(obj, env.kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err.message}")


def test_the_schema_check_catches_a_misspelled_field(objects, env):
    dep = copy.deepcopy(get(objects, "Deployment", "tgi-mistral-7b-instruct"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, env.kubernetes_version, strict=True)


# -- reaching them ---------------------------------------------------------------------------


def test_the_serve_models_urls_are_the_rendered_services(objects, mixed):
    app = yaml.safe_load(get(objects, "RayService", APP)["spec"]["serveConfigV2"])
    args = {m["name"]: m for m in app["applications"][0]["args"]["models"]}
    triton, tgi = model(mixed, "triton"), model(mixed, "openai-upstream")
    svc = get(objects, "Service", "triton-qwen2-5-7b-instruct")
    grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert triton.triton_url() == f"{svc['metadata']['name']}:{grpc['port']}"
    assert args[triton.name]["triton"]["url"] == triton.triton_url()
    svc = get(objects, "Service", "tgi-mistral-7b-instruct")
    (http,) = svc["spec"]["ports"]
    assert tgi.upstream_url() == f"http://{svc['metadata']['name']}:{http['port']}/v1"
    assert args[tgi.name]["upstream"]["base_url"] == tgi.upstream_url()
    # The Service reaches the server's container port by name.
    pod = get(objects, "Deployment", "tgi-mistral-7b-instruct")["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert http["targetPort"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


def test_the_monitor_scrapes_the_services_metrics_port(objects):
    for name, port in (("triton-qwen2-5-7b-instruct", 8002), ("tgi-mistral-7b-instruct", 8080)):
        mon = get(objects, "ServiceMonitor", name)["spec"]
        svc = get(objects, "Service", name)
        assert mon["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        (endpoint,) = mon["endpoints"]
        target = next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])
        pod = get(objects, "Deployment", name)["spec"]["template"]["spec"]
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert ports[target["targetPort"]] == port and endpoint["path"] == "/metrics"


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_only_the_serve_pods_of_the_rayservice_reach_a_server(objects):
    rs = get(objects, "RayService", APP)["spec"]["rayClusterConfig"]
    serve_pod = rs["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    other = get(objects, "RayService", "openai")["spec"]["rayClusterConfig"][
        "workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    for name, port in (("triton-qwen2-5-7b-instruct", 8001), ("tgi-mistral-7b-instruct", 8080)):
        pod = get(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        ingress = [p for p in objects if p["kind"] == "NetworkPolicy"
                   and p["metadata"]["namespace"] == "inference"
                   and "Ingress" in p["spec"]["policyTypes"]
                   and selects(p["spec"]["podSelector"], pod)]
        # default-deny and allow-linkerd select every pod; the server's own policy admits:
        rules = [(peer, r.get("ports")) for p in ingress for r in p["spec"]["ingress"]
                 for peer in r.get("from", [])]
        pod_peers = [(peer["podSelector"], ports) for peer, ports in rules
                     if "podSelector" in peer and "namespaceSelector" not in peer]
        assert pod_peers == [({"matchLabels": {"rayplane.io/ray-node": "true",
                                               "rayplane.io/cluster": APP}},
                              [{"protocol": "TCP", "port": port}])]
        assert selects(pod_peers[0][0], serve_pod) and not selects(pod_peers[0][0], other)
        # and the Serve pods may send to it (their egress is denied by default)
        egress = [p for p in objects if p["kind"] == "NetworkPolicy"
                  and p["metadata"]["namespace"] == "inference"
                  and "Egress" in p["spec"]["policyTypes"]
                  and selects(p["spec"]["podSelector"], serve_pod)
                  and any("podSelector" in t and "namespaceSelector" not in t
                          and selects(t["podSelector"], pod)
                          for r in p["spec"]["egress"] for t in r.get("to", []))]
        assert [r["ports"] for p in egress for r in p["spec"]["egress"]] == [
            [{"protocol": "TCP", "port": port}]]


def test_prometheus_may_scrape_tritons_metrics_port(objects):
    scrape = get(objects, "NetworkPolicy", "allow-triton-metrics-scrape", "monitoring")
    (rule,) = scrape["spec"]["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8002}]
    allow = get(objects, "NetworkPolicy", "allow-triton-qwen2-5-7b-instruct")["spec"]
    assert {"protocol": "TCP", "port": 8002} in allow["ingress"][1]["ports"]


def test_new_kinds_sync_with_the_workloads_after_the_monitoring_crds(objects, env):
    apps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Application"}
    workloads = apps[f"rayplane-{env.name}"]["spec"]["source"]["directory"]["include"]
    for kind in ("Deployment", "ServiceMonitor"):
        assert file_name(kind) in workloads


# -- specs that could never run --------------------------------------------------------------


def _set(i: int, **changes):
    def mutate(doc):
        for key, value in changes.items():
            target = doc["models"][i]
            *path, last = key.split(".")
            for part in path:
                target = target[part]
            target[last] = value
    return mutate


def test_a_triton_container_on_a_pool_that_does_not_exist_is_refused(catalog, env):
    msg = one_line_error(catalog, env, _set(1, pool="a100-mgi"), "models[1].pool")
    assert "a100-mig" in msg  # the near miss


def test_a_server_on_a_pool_without_gpus_is_refused(catalog, env):
    one_line_error(catalog, env, _set(2, pool="cpu"), "models[2].pool")


def test_max_model_len_past_what_the_mig_unit_holds_is_refused(catalog, env):
    msg = one_line_error(catalog, env, _set(2, max_model_len=200_000), "models[2].max_model_len")
    assert "164031" in msg


def test_weights_larger_than_the_unit_are_refused(catalog, env):
    one_line_error(catalog, env, _set(2, **{"upstream.model_shape.parameters_b": 20}),
                   "models[2].upstream.model_shape.parameters_b")


def test_tgi_without_the_models_shape_is_refused(catalog, env):
    def mutate(doc):
        del doc["models"][2]["upstream"]["model_shape"]
    one_line_error(catalog, env, mutate, "models[2].upstream.model_shape")


def test_a_model_name_that_cannot_name_a_service_is_refused(catalog, env):
    one_line_error(catalog, env, _set(1, name="Qwen_7B"), "models[1].name")
