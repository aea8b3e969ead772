"""KubeRay objects from the catalog: worker groups carry their pool's placement,
GPU resource and Ray resources; token auth and GCS FT are on; the same serve config becomes
the RayService's serveConfigV2; bad input is refused with the field named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from raycluster.catalog import Catalog
from raycluster.environments import ClusterSpec, RayServiceSpec
from raycluster.kuberay import (
    AUTH_SECRET,
    render_raycluster,
    render_rayservice,
    resolve_group,
    serve_groups,
)
from raycluster.spec import SpecError
from serve.builder import to_serve_config
from serve.config import ServeAppConfig

REPO = Path(__file__).resolve().parents[3]
EKS_SERVE = REPO / "serve" / "configs" / "eks-vllm.yaml"


def cluster(groups: list[dict], namespace: str = "training", **kw) -> ClusterSpec:
    return ClusterSpec.parse({"name": "c", "namespace": namespace, "worker_groups": groups, **kw})


def parse_resources(param: str) -> dict[str, float]:
    """rayStartParams resources as `ray start` receives it after the shell strips quoting."""
    assert param.startswith('"') and param.endswith('"')
    return json.loads(param[1:-1].replace('\\"', '"'))


@pytest.mark.parametrize("pool_name", ["cpu", "a100-timeslice", "a100-mig", "h100-timeslice"])
def test_a_worker_group_carries_its_pools_placement_and_resources(catalog, env, pool_name):
    pool = catalog.pool(pool_name)
    # Quotas count each GPU resource name on its own: MIG units are the inference
    # namespace's, time-slice units the training namespace's.
    ns = "inference" if pool_name == "a100-mig" else "training"
    obj = render_raycluster(catalog, env, cluster([{"pool": pool_name}], namespace=ns))
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
    assert worker_pod["serviceAccountName"] == "ray"  # what Terraform's IRSA trusts
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


def test_a_group_sized_unlike_the_pools_worker_holds_what_its_shape_fits(catalog):
    pool = catalog.pool("cpu")
    cpus, memory = 1, max(1, pool.worker.memory_gib // 4)
    group = cluster([{"pool": "cpu", "cpus": cpus, "memory_gib": memory}]).worker_groups[0]
    shape = resolve_group(catalog, group, "clusters[0].worker_groups[0]")
    # What a node holds of this shape (its allocatable, raycluster/capacity.py).
    per_node = pool.workers_per_node_of(gpu_units=0, cpus=cpus, memory_gib=memory)
    assert shape.max_replicas == per_node * pool.max_nodes
    assert per_node > pool.workers_per_node, "a smaller worker packs more pods on a node"


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
    # inference's GPU quota is MIG units only, and quotas count each GPU resource name on its
    # own: a time-slice worker (nvidia.com/gpu) there could never be admitted.
    with pytest.raises(SpecError) as err:
        render_raycluster(catalog, env, cluster([{"pool": "h100-timeslice"}],
                                                namespace="inference"), field="clusters[2]")
    msg = str(err.value)
    assert msg.startswith("clusters[2].worker_groups[0]: one worker needs 1 ")
    assert "nvidia.com/gpu" in msg
    assert "namespaces[1].quota.gpus" in msg
    # A namespace whose CPU quota is below one worker's CPUs.
    data = yaml.safe_load((REPO / "raycluster/data/pools.yaml").read_text())
    data["namespaces"][0]["quota"]["cpus"] = 6
    small = Catalog.parse(data)
    with pytest.raises(SpecError) as err:
        render_raycluster(small, env, cluster([{"pool": "h100-timeslice"}]), field="clusters[0]")
    cpus = catalog.pool("h100-timeslice").worker.cpus
    assert f"clusters[0].worker_groups[0]: one worker needs {cpus} CPUs" in str(err.value)
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
    return ServeAppConfig.from_file(EKS_SERVE)


def test_the_rayservice_carries_the_serve_config_unchanged(catalog, env, serve_cfg):
    svc = RayServiceSpec.parse({"config": "serve/configs/eks-vllm.yaml"})
    serve_config = to_serve_config(serve_cfg, catalog)
    obj = render_rayservice(catalog, env, svc, serve_cfg, serve_config)
    # The same document `serve deploy` takes locally.
    assert yaml.safe_load(obj["spec"]["serveConfigV2"]) == to_serve_config(serve_cfg, catalog)
    # The production cluster has the Gateway API: upgrades shift traffic step by step
    # (tests/unit/raycluster/test_serving_production.py).
    assert obj["spec"]["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
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


def test_the_rayservice_ingress_is_haproxy_unless_asked_for_rays_proxy(catalog, env, serve_cfg):
    serve_config = to_serve_config(serve_cfg, catalog)

    def flags(svc):
        cluster_spec = render_rayservice(catalog, env, svc, serve_cfg,
                                         serve_config)["spec"]["rayClusterConfig"]
        templates = [cluster_spec["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster_spec["workerGroupSpecs"])]
        return [{e["name"]: e.get("value") for e in t["spec"]["containers"][0]["env"]}
                .get("RAY_SERVE_ENABLE_HA_PROXY") for t in templates]

    assert set(flags(RayServiceSpec.parse({"config": "x.yaml"}))) == {"1"}
    assert set(flags(RayServiceSpec.parse({"config": "x.yaml", "serve_proxy": "ray"}))) == {None}
    with pytest.raises(SpecError, match=r"serve_proxy: .nginx.: must be one of haproxy, ray"):
        RayServiceSpec.parse({"config": "x.yaml", "serve_proxy": "nginx"})


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
def test_tensor_parallelism_on_shared_gpu_units(catalog, env, serve_cfg, pool_name):
    """Refused on the render path, by the serve config's own placement check, before any
    worker group is sized: the file and the model's field are named."""
    from raycluster.render import render_service

    cfg = _serve_variant(serve_cfg, pool=pool_name, tensor_parallel_size=2)
    svc = RayServiceSpec.parse({"config": "x.yaml"})
    with pytest.raises(SpecError) as err:
        render_service(catalog, env, svc, cfg, field="services[0]")
    assert str(err.value).startswith(
        "services[0].config(x.yaml): models[0].tensor_parallel_size: 2 needs whole GPUs, but "
        f"pool '{pool_name}' cannot give them")
    assert err.value.field == "models[0].tensor_parallel_size"


@pytest.mark.parametrize("pool_name", ["a100-mig", "a100-timeslice"])
def test_tensor_parallelism_of_a_cpu_engine_model_is_refused_by_the_serve_config(pool_name):
    """tensor_parallel_size is a vLLM setting: on a CPU-engine model the serve config refuses
    it by name, before any worker group is sized for GPUs the engine would never use."""
    with pytest.raises(SpecError) as err:
        ServeAppConfig.parse({
            "models": [{"name": "m", "source": "/models/m", "pool": pool_name, "engine": "cpu",
                        "tensor_parallel_size": 2}],
            "allow_unauthenticated": True, "http": {"host": "0.0.0.0"}}, source="x.yaml")
    assert str(err.value) == ("x.yaml: models[0].tensor_parallel_size: is a vllm setting and "
                              "this model's engine is 'cpu'; remove it or set engine: vllm")
    assert err.value.field.startswith("models[0]")


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
        render_rayservice(catalog, env, svc, cfg, to_serve_config(cfg, catalog))


# -- RayJob / RayCronJob from a training config ---------------------------------------------

TRAIN_CONFIG = "train/configs/demo.yaml"
CUSTOM = {"CPU", "GPU", "memory", "object_store_memory"}


@pytest.fixture(scope="module")
def train_cfg():
    from train.config import TrainConfig

    return TrainConfig.load(REPO / TRAIN_CONFIG)


def _job(**kw):
    from raycluster.environments import RayJobSpec

    return RayJobSpec.parse({"config": TRAIN_CONFIG, **kw})


def test_the_rayjob_worker_group_asks_the_same_custom_resources_as_locally(
        catalog, env, train_cfg, tmp_path):
    from raycluster.kuberay import render_rayjob
    from raycluster.local import LocalCluster
    from train.config import worker_resources

    obj = render_rayjob(catalog, env, _job(), train_cfg)
    group, = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    advertised = parse_resources(group["rayStartParams"]["resources"])
    asked_locally = worker_resources(catalog, train_cfg, local=True)
    # The custom resources the KubeRay worker group advertises are the ones the same config
    # asks for on the local cluster, and what the local node for the pool advertises.
    assert set(advertised) == set(asked_locally) - CUSTOM
    local_node = next(n for n in LocalCluster(state_dir=tmp_path, catalog=catalog).node_plan()
                      if n.pool == train_cfg.pool)
    assert set(advertised) == set(local_node.resources)
    # And every resource a worker asks on KubeRay is there, once per Ray Train worker.
    asked = worker_resources(catalog, train_cfg, local=False)
    offer = {**advertised, "CPU": float(group["rayStartParams"]["num-cpus"]),
             "GPU": float(group["rayStartParams"].get("num-gpus", 0))}
    for key, amount in asked.items():
        assert offer[key] * group["replicas"] >= amount * train_cfg.num_workers, key
    assert group["template"]["spec"]["nodeSelector"] == {"rayplane.io/pool": train_cfg.pool}


def test_the_rayjob_runs_the_same_entrypoint_and_tears_down(catalog, env, train_cfg):
    from raycluster.kuberay import render_rayjob

    spec = render_rayjob(catalog, env, _job(backoff_limit=1), train_cfg)["spec"]
    assert spec["entrypoint"] == f"python -m train.fit --config {TRAIN_CONFIG}"
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert spec["activeDeadlineSeconds"] == 6 * 3600
    assert spec["backoffLimit"] == 1
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == env.mlflow_tracking_uri
    assert runtime_env["env_vars"]["RAYPLANE_STORAGE_PATH"].startswith(env.storage.mount_path)
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    # The token reaches the submitter as a file, never as a literal in the manifest.
    env_vars = {e["name"]: e.get("value") for e in submitter["containers"][0]["env"]}
    assert env_vars["RAY_AUTH_MODE"] == "token"
    assert env_vars["RAY_AUTH_TOKEN_PATH"].startswith("/var/run/secrets/ray/")
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_a_training_config_larger_than_its_pool(catalog, env, train_cfg):
    from raycluster.kuberay import render_rayjob

    pool = catalog.pool(train_cfg.pool)
    big = type(train_cfg).parse({**train_cfg.model_dump(mode="json"),
                                 "num_workers": pool.max_workers + 1})
    with pytest.raises(SpecError) as err:
        render_rayjob(catalog, env, _job(), big, field="jobs[0]")
    assert str(err.value).startswith(
        f"jobs[0].config({TRAIN_CONFIG}).num_workers: {pool.max_workers + 1} workers need")


def test_a_training_config_on_a_pool_that_does_not_exist(catalog, env, train_cfg):
    from raycluster.kuberay import render_rayjob

    bad = type(train_cfg).parse({**train_cfg.model_dump(mode="json"), "pool": "h100-timeslise"})
    with pytest.raises(SpecError, match=r"'h100-timeslise' is not a pool.*did you mean "
                                        r"'h100-timeslice'"):
        render_rayjob(catalog, env, _job(), bad, field="jobs[0]")


def test_the_raycronjob_wraps_the_same_rayjob_on_a_schedule(catalog, env, train_cfg):
    from raycluster.environments import RayCronJobSpec
    from raycluster.kuberay import render_raycronjob, render_rayjob

    cron = RayCronJobSpec.parse({"name": "nightly", "config": TRAIN_CONFIG,
                                 "schedule": "0 2 * * *", "time_zone": "Europe/Berlin"})
    spec = render_raycronjob(catalog, env, cron, train_cfg)["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec["timeZone"] == "Europe/Berlin"
    job = render_rayjob(catalog, env, _job(), train_cfg)["spec"]
    assert spec["jobTemplate"]["entrypoint"] == job["entrypoint"]
    assert spec["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"] == \
        job["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]
    with pytest.raises(SpecError, match="schedule"):
        RayCronJobSpec.parse({"name": "n", "config": TRAIN_CONFIG, "schedule": "nightly"})
