"""KubeRay objects from the catalog (issue 5): worker groups carry their pool's placement,
GPU resource and Ray resources; token auth and GCS FT are on; the same serve config becomes
the RayService's serveConfigV2; bad input is refused with the field named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from raycluster.catalog import Catalog, load_catalog
from raycluster.environments import ClusterSpec, Environment, RayServiceSpec, load_environment
from raycluster.kuberay import (
    AUTH_SECRET,
    render_raycluster,
    render_rayservice,
    resolve_group,
    serve_groups,
)
from raycluster.spec import SpecError

REPO = Path(__file__).resolve().parents[3]
EKS_SERVE = REPO / "serve" / "configs" / "eks-vllm.yaml"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def env() -> Environment:
    return load_environment("production")


def cluster(groups: list[dict], namespace: str = "training", **kw) -> ClusterSpec:
    return ClusterSpec.parse({"name": "c", "namespace": namespace, "worker_groups": groups, **kw})


def parse_resources(param: str) -> dict[str, float]:
    """rayStartParams resources as `ray start` receives it after the shell strips quoting."""
    assert param.startswith('"') and param.endswith('"')
    return json.loads(param[1:-1].replace('\\"', '"'))


@pytest.mark.parametrize("pool_name", ["cpu", "a100-timeslice", "a100-mig", "h100-timeslice"])
def test_a_worker_group_carries_its_pools_placement_and_resources(catalog, env, pool_name):
    pool = catalog.pool(pool_name)
    obj = render_raycluster(catalog, env, cluster([{"pool": pool_name}]))
    group, = obj["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert group["groupName"] == pool_name
    assert pod["nodeSelector"] == {"rayplane.io/pool": pool_name}
    assert pod.get("tolerations", []) == [t.toleration() for t in pool.taints]
    params = group["rayStartParams"]
    # The same custom resource the local cluster's node for this pool advertises.
    assert parse_resources(params["resources"]) == pool.ray_resources()
    assert params["num-cpus"] == str(pool.worker.cpus)
    limits = container["resources"]["limits"]
    assert limits == container["resources"]["requests"]
    if pool.has_gpu:
        assert params["num-gpus"] == str(pool.worker.gpu_units)
        assert limits[pool.kubernetes_resource] == str(pool.worker.gpu_units)
        assert container["image"].endswith(env.images.gpu_tag)
        # Scale to zero: an idle GPU group costs nothing.
        assert group["minReplicas"] == 0 and group["replicas"] == 0
    else:
        assert "num-gpus" not in params
        assert not any(k.startswith("nvidia.com/") for k in limits)
    assert group["maxReplicas"] == pool.max_workers


def test_the_mig_pool_asks_for_mig_instances_by_name(catalog, env):
    obj = render_raycluster(catalog, env, cluster([{"pool": "a100-mig"}], namespace="inference"))
    limits = obj["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]
    assert limits["nvidia.com/mig-3g.40gb"] == "1"
    assert "nvidia.com/gpu" not in limits


def test_cluster_has_token_auth_autoscaling_and_a_cpu_head(catalog, env):
    spec = render_raycluster(catalog, env, cluster([{"pool": "a100-timeslice"}]))["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["rayVersion"] == env.ray_version
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["nodeSelector"] == catalog.head_pool.node_selector
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["automountServiceAccountToken"] is True
    worker_pod = spec["workerGroupSpecs"][0]["template"]["spec"]
    assert worker_pod["automountServiceAccountToken"] is False
    assert worker_pod["serviceAccountName"] == "ray-workload"
    mounts = {m["mountPath"] for m in worker_pod["containers"][0]["volumeMounts"]}
    assert env.storage.mount_path in mounts  # the shared EFS volume
    assert "gcsFaultToleranceOptions" not in spec


def test_ray_version_matches_the_installed_ray(env):
    import ray

    assert env.ray_version == ray.__version__


def test_gcs_fault_tolerance_uses_the_external_redis(catalog, env):
    spec = render_raycluster(catalog, env, cluster([{"pool": "cpu"}], namespace="agentic",
                                                   gcs_fault_tolerance=True))["spec"]
    ft = spec["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == env.redis_address
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "password"


def test_priority_defaults_to_the_namespace_and_can_be_named(catalog, env):
    default = render_raycluster(catalog, env, cluster([{"pool": "a100-timeslice"}]))
    assert default["spec"]["headGroupSpec"]["template"]["spec"]["priorityClassName"] == "training"
    research = render_raycluster(catalog, env, cluster([{"pool": "a100-timeslice"}],
                                                       priority_class="research"))
    group = research["spec"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["priorityClassName"] == "research"


# -- bad input, refused with the field named ------------------------------------------------


def test_a_worker_group_on_a_pool_that_does_not_exist(catalog, env):
    with pytest.raises(SpecError) as err:
        render_raycluster(catalog, env, cluster([{"pool": "a100-mgi"}]), field="clusters[0]")
    assert str(err.value).startswith("clusters[0].worker_groups[0].pool: 'a100-mgi' is not a pool")
    assert "did you mean 'a100-mig'" in str(err.value)


def test_a_gpu_request_larger_than_a_node_of_the_pool(catalog, env):
    units = catalog.pool("a100-mig").gpu_units_per_node  # 8 GPUs x 2 instances of 3g.40gb
    with pytest.raises(SpecError) as err:
        render_raycluster(catalog, env, cluster([{"pool": "a100-mig", "gpu_units": units + 1}],
                                                namespace="inference"), field="clusters[1]")
    msg = str(err.value)
    assert msg.startswith(f"clusters[1].worker_groups[0].gpu_units: {units + 1} is more than a "
                          f"node of pool 'a100-mig' holds ({units} units")


def test_several_time_slice_replicas_in_one_pod(catalog, env):
    with pytest.raises(SpecError) as err:
        resolve_group(catalog, cluster([{"pool": "a100-timeslice", "gpu_units": 2}])
                      .worker_groups[0], "clusters[0].worker_groups[0]")
    assert "clusters[0].worker_groups[0].gpu_units: 2 time-slice replicas" in str(err.value)


def test_gpu_units_on_the_cpu_pool(catalog, env):
    with pytest.raises(SpecError, match=r"worker_groups\[0\]\.gpu_units: 1 but pool 'cpu' "
                                        r"has no GPU"):
        render_raycluster(catalog, env, cluster([{"pool": "cpu", "gpu_units": 1}]))


def test_a_quota_smaller_than_one_worker(catalog, env):
    # mlops has no GPU quota: a GPU worker there could never be admitted.
    with pytest.raises(SpecError) as err:
        render_raycluster(catalog, env, cluster([{"pool": "h100-timeslice"}], namespace="mlops"),
                          field="clusters[2]")
    msg = str(err.value)
    assert msg.startswith("clusters[2].worker_groups[0]: one worker needs 1 GPU units")
    assert "namespaces[3].quota.gpus" in msg
    # A namespace whose CPU quota is below one worker's CPUs.
    data = yaml.safe_load((REPO / "raycluster/data/pools.yaml").read_text())
    data["namespaces"][0]["quota"]["cpus"] = 6
    small = Catalog.parse(data)
    with pytest.raises(SpecError) as err:
        render_raycluster(small, env, cluster([{"pool": "h100-timeslice"}]), field="clusters[0]")
    assert "clusters[0].worker_groups[0]: one worker needs 8 CPUs" in str(err.value)
    assert "namespaces[0].quota.cpus) is 6" in str(err.value)


def test_a_cluster_in_a_namespace_the_catalog_does_not_have(catalog, env):
    with pytest.raises(SpecError, match=r"^cluster\.namespace: 'trainig' is not a namespace.*"
                                        r"did you mean 'training'"):
        render_raycluster(catalog, env, cluster([{"pool": "cpu"}], namespace="trainig"))


def test_two_groups_with_one_name(catalog, env):
    with pytest.raises(SpecError, match=r"worker_groups\[1\]\.name: 'a100-timeslice' is used"):
        render_raycluster(catalog, env, cluster([{"pool": "a100-timeslice"},
                                                 {"pool": "a100-timeslice"}]))


# -- RayService from a serve config ---------------------------------------------------------


@pytest.fixture(scope="module")
def serve_cfg():
    from serve.config import ServeAppConfig

    return ServeAppConfig.from_file(EKS_SERVE)


def test_the_rayservice_carries_the_serve_config_unchanged(catalog, env, serve_cfg):
    svc = RayServiceSpec.parse({"config": "serve/configs/eks-vllm.yaml"})
    serve_config = serve_cfg.to_serve_config(catalog)
    obj = render_rayservice(catalog, env, svc, serve_cfg, serve_config)
    # The same document `serve deploy` takes locally.
    assert yaml.safe_load(obj["spec"]["serveConfigV2"]) == serve_cfg.to_serve_config(catalog)
    assert obj["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    cluster_spec = obj["spec"]["rayClusterConfig"]
    assert cluster_spec["gcsFaultToleranceOptions"]["redisAddress"] == env.redis_address
    groups = {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
    mig = groups["a100-mig"]["template"]["spec"]
    # Production inference on the MIG pool, at production-inference priority.
    assert mig["priorityClassName"] == "production-inference"
    assert mig["containers"][0]["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == "1"
    # Every resource a replica's placement bundle asks is advertised by its worker group.
    bundles = serve_config["applications"][0]["args"]["llm_configs"][0][
        "placement_group_config"]["bundles"]
    params = groups["a100-mig"]["rayStartParams"]
    offer = {**parse_resources(params["resources"]), "GPU": float(params["num-gpus"]),
             "CPU": float(params["num-cpus"])}
    for bundle in bundles:
        for key, amount in bundle.items():
            assert offer.get(key, 0) >= amount, key
    # The API keys come from a Secret as the env variable the serve config names.
    env_names = {e["name"] for e in mig["containers"][0]["env"]}
    assert serve_cfg.api_keys.env in env_names


def test_serve_groups_cover_the_autoscaling_maximum(catalog, serve_cfg):
    groups = {g.name: g for g in serve_groups(catalog, serve_cfg, field="services[0]")}
    model = serve_cfg.models[0]
    assert groups[model.pool].max_replicas == model.autoscaling.max_replicas
    assert groups[model.pool].min_replicas == model.autoscaling.min_replicas
    assert groups[serve_cfg.ingress.pool].min_replicas >= 1


def _serve_variant(serve_cfg, **model_changes):
    data = copy.deepcopy(serve_cfg.model_dump(mode="json"))
    data["models"][0].update(model_changes)
    return type(serve_cfg).parse(data)


@pytest.mark.parametrize("pool_name", ["a100-mig", "a100-timeslice"])
def test_tensor_parallelism_on_shared_gpu_units(catalog, serve_cfg, pool_name):
    cfg = _serve_variant(serve_cfg, pool=pool_name, tensor_parallel_size=2)
    with pytest.raises(SpecError) as err:
        serve_groups(catalog, cfg, field="services[0].config(x.yaml)")
    assert str(err.value).startswith(
        f"services[0].config(x.yaml).models[0].tensor_parallel_size: 2 on pool '{pool_name}'")


def test_a_replica_larger_than_a_node(catalog, serve_cfg):
    units = catalog.pool("a100-mig").gpu_units_per_node
    cfg = _serve_variant(serve_cfg, gpu_units=units + 1)
    with pytest.raises(SpecError, match=rf"models\[0\]\.gpu_units: one replica needs "
                                        rf"{units + 1} GPU units but a node of pool 'a100-mig' "
                                        rf"holds {units}"):
        serve_groups(catalog, cfg, field="services[0]")


def test_a_serve_config_bound_to_localhost_is_refused(catalog, env, serve_cfg):
    data = serve_cfg.model_dump(mode="json")
    data["http"]["host"] = "127.0.0.1"
    cfg = type(serve_cfg).parse(data)
    svc = RayServiceSpec.parse({"config": "x.yaml"})
    with pytest.raises(SpecError, match=r"service\.config\(x\.yaml\)\.http\.host: '127\.0\.0\.1'"):
        render_rayservice(catalog, env, svc, cfg, cfg.to_serve_config(catalog))
