"""The pods of a KubeRay cluster: containers, volumes, mounts, environment and resources,
the head and worker group specs, the RayJob submitter's pod, and the API keys a Serve pod
reads. Every pod meets the ``restricted`` Pod Security Standard; a worker group's pods carry
their pool's node selector, tolerations, GPU resource and ``rayStartParams``."""

from __future__ import annotations

import json
import math
from typing import Any

from raycluster.catalog import Catalog, Pool
from raycluster.environments import Environment
from raycluster.kuberay.sizing import GroupShape, check_worker_fits_pool
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
    checkov_skips,
    container_security_context,
    cpu_quantity,
    pod_security_context,
)
from raycluster.spec import SpecError
from serve.config import ApiKeys, TenantSpec

#: Secret (key ``auth_token``) with the cluster token; External Secrets fills it from AWS
#: Secrets Manager (raycluster.render), so KubeRay does not mint one per cluster and users
#: can reach every cluster of a namespace with one token.
AUTH_SECRET = "rayplane-ray-auth"
AUTH_SECRET_KEY = "auth_token"
#: Secret (key ``password``) with the Redis AUTH token for GCS fault tolerance.
REDIS_SECRET = "rayplane-redis"
#: Secret (key ``keys``) with the OpenAI endpoint's API keys, filled by External Secrets.
API_KEYS_SECRET = "rayplane-serve-api-keys"
API_KEYS_SECRET_KEY = "keys"
#: ServiceAccount of Ray pods in each namespace; IRSA gives it the S3 role (Terraform's
#: workload_identities trust exactly <namespace>/ray).
SERVICE_ACCOUNT = "ray"
#: PersistentVolumeClaim of the shared EFS volume (datasets, checkpoints) in each namespace.
SHARED_CLAIM = "rayplane-shared"
HOME = "/home/ray"
#: Where GPU pods' compilers and model libraries cache, all under the writable ``~/.cache``
#: mount (the root filesystem is read-only): Triton's kernel cache defaults to ``~/.triton``
#: and CUDA's JIT cache to ``~/.nv``, both on the read-only root, so vLLM's first
#: torch.compile / Triton kernel build would fail there.
GPU_CACHE_ENV = {
    "XDG_CACHE_HOME": f"{HOME}/.cache",
    "TRITON_HOME": f"{HOME}/.cache",
    "TRITON_CACHE_DIR": f"{HOME}/.cache/triton",
    "VLLM_CACHE_ROOT": f"{HOME}/.cache/vllm",
    "HF_HOME": f"{HOME}/.cache/huggingface",
    "TORCHINDUCTOR_CACHE_DIR": f"{HOME}/.cache/torchinductor",
    "CUDA_CACHE_PATH": f"{HOME}/.cache/nv/ComputeCache",
}
#: What the head's Ray dashboard embeds its metrics from: Grafana and Prometheus of
#: kube-prometheus-stack (release `kube-prometheus-stack` in `monitoring`, infra/helm/
#: charts.yaml; its Services are <release>-grafana and <release>-prometheus). The iframe host
#: is Grafana as the user's browser reaches it (`kubectl -n monitoring port-forward
#: svc/kube-prometheus-stack-grafana 3000:80`; docs/monitoring.md). The dashboards it embeds
#: are rendered from the same Ray (raycluster.monitoring).
MONITORING_ENV = {
    "RAY_GRAFANA_HOST": "http://kube-prometheus-stack-grafana.monitoring.svc:80",
    "RAY_PROMETHEUS_HOST": "http://kube-prometheus-stack-prometheus.monitoring.svc:9090",
    "RAY_GRAFANA_IFRAME_HOST": "http://127.0.0.1:3000",
}


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
        out.extend({"name": k, "value": v} for k, v in GPU_CACHE_ENV.items())
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
    container["env"].extend({"name": k, "value": v} for k, v in MONITORING_ENV.items())
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


def submitter_template(env: Environment, name: str, namespace: str) -> dict:
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


def api_key_wiring(keys: ApiKeys | None, template: dict) -> None:
    """Hand the API keys to the Serve pods from the Secret External Secrets fills: as the env
    variable or the file the config's ``api_keys`` names."""
    if keys is None:
        return
    if keys.env:
        secret_env(template, keys.env, API_KEYS_SECRET, API_KEYS_SECRET_KEY,
                   why="the serve config reads its API keys from an env variable "
                       "(api_keys.env)")
    if keys.file:
        secret_file(template, keys.file, API_KEYS_SECRET, API_KEYS_SECRET_KEY,
                    volume="api-keys")


def tenant_secret_key(tenant: str) -> str:
    """The key of the API keys Secret holding a serve config tenant's keys."""
    return f"tenant-{tenant}"


def tenant_key_wiring(tenants: list[TenantSpec], template: dict, field: str) -> None:
    """Hand each tenant's API keys (``tenants[i].api_keys``) to the Serve pods from the key
    ``tenant-<name>`` of the API keys Secret, as the env variable or the file it names. Key
    files in one folder share that folder's volume of the Secret (a folder mounts once)."""
    spec = template["spec"]
    for i, tenant in enumerate(tenants):
        key = tenant_secret_key(tenant.name)
        if tenant.api_keys.env:
            secret_env(template, tenant.api_keys.env, API_KEYS_SECRET, key,
                       why="the serve config reads a tenant's API keys from an env variable "
                           "(tenants[].api_keys.env)")
        path = tenant.api_keys.file
        if not path:
            continue
        folder, _, name = path.rpartition("/")
        mount = next((m for m in spec["containers"][0]["volumeMounts"]
                      if m["mountPath"] == (folder or "/")), None)
        if mount is None:
            secret_file(template, path, API_KEYS_SECRET, key, volume=f"tenant-{tenant.name}-keys")
            continue
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"]).get("secret", {})
        if volume.get("secretName") != API_KEYS_SECRET or \
                name in {item["path"] for item in volume.get("items", [])}:
            where = f"{field}.tenants[{i}].api_keys.file"
            raise SpecError(f"{where}: {path!r} lies in {folder or '/'}, where the pods mount "
                            f"{mount['name']!r} already; give the tenant's key file a folder "
                            "of its own", field=where)
        volume["items"].append({"key": key, "path": name})


def secret_env(template: dict, var: str, secret: str, key: str, *, why: str) -> None:
    """Set ``var`` in the pod's Ray container from ``key`` of ``secret``. checkov prefers
    secrets as files (CKV_K8S_35); where a config asks for an env variable, the pod says why
    (once per pod)."""
    container = template["spec"]["containers"][0]
    container["env"].append({"name": var, "valueFrom": {"secretKeyRef": {
        "name": secret, "key": key}}})
    annotations = template["metadata"]["annotations"]
    if not any(v.startswith("CKV_K8S_35=") for v in annotations.values()):
        annotations[f"checkov.io/skip{len(annotations) + 1}"] = (
            f"CKV_K8S_35={why}; the value comes from a Secret filled by External Secrets")


def secret_file(template: dict, path: str, secret: str, key: str, *, volume: str) -> None:
    """Mount ``key`` of ``secret`` read-only as the file ``path`` in the Ray container."""
    spec = template["spec"]
    folder, _, name = path.rpartition("/")
    spec["volumes"].append({"name": volume, "secret": {
        "secretName": secret, "defaultMode": 0o440,
        "items": [{"key": key, "path": name}]}})
    spec["containers"][0]["volumeMounts"].append({"name": volume, "mountPath": folder or "/",
                                                  "readOnly": True})


__all__ = [
    "API_KEYS_SECRET",
    "API_KEYS_SECRET_KEY",
    "AUTH_SECRET",
    "AUTH_SECRET_KEY",
    "GPU_CACHE_ENV",
    "HOME",
    "MONITORING_ENV",
    "REDIS_SECRET",
    "SERVICE_ACCOUNT",
    "SHARED_CLAIM",
    "api_key_wiring",
    "head_group_spec",
    "secret_env",
    "secret_file",
    "submitter_template",
    "tenant_key_wiring",
    "tenant_secret_key",
    "worker_group_spec",
]
