"""Inference servers rayplane renders beside a RayService on EKS (issue 18): NVIDIA's Triton
container for an ``engine: triton`` model with ``triton.server: container``, and Hugging Face
TGI for an ``engine: openai-upstream`` model with ``upstream.server: tgi``. The Serve replica of
such a model is a client (Triton's KServe v2 gRPC, or the OpenAI proxy); the server holds the
model, on the model's ``pool``, one GPU unit per pod, exactly where a Ray worker of that pool
would run (node selector, tolerations, GPU resource, the pool's worker shape).

Each server is a Deployment and a Service named ``triton-<model>`` / ``tgi-<model>`` in the
RayService's namespace (``ModelSpec.triton_url()`` / ``upstream_url()``, so the replica reaches
it by its short name), plus:

- the weights, fetched before the server starts by an init container of the platform's CPU
  image (``serve.engines.model_source.fetch_model``: MLflow registry, runs and ``s3://``
  through the pod's IRSA role, as the CPU engine and the vLLM download callback fetch them)
  into an emptyDir, linked as ``/weights/model``;
- Triton: its model repository as a ConfigMap (``config.pbtxt``: the vLLM backend, decoupled,
  so the replica can stream; ``model.json``: vLLM's engine arguments, with
  ``gpu_memory_utilization`` and ``max_num_seqs`` from the pool's sharing, as
  ``serve/engines/vllm_config.py`` derives them for the vllm engine);
- TGI: ``--max-batch-total-tokens`` from the unit's memory (:func:`tgi_max_batch_total_tokens`)
  and ``--max-input-tokens`` / ``--max-total-tokens`` from ``max_model_len``;
- a ServiceMonitor (prometheus-operator) on the metrics port: Triton's 8002, TGI's /metrics;
- NetworkPolicies: only the Serve pods of the RayService reach the server (TGI has no API
  key: this is its access control), Prometheus scrapes it.

Pods meet ``restricted``: non-root, every capability dropped, RuntimeDefault seccomp, a
read-only root filesystem with emptyDirs where the servers write (/tmp, caches, /dev/shm).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from raycluster.catalog import Catalog, Pool
from raycluster.environments import Environment, RayServiceSpec
from raycluster.kuberay.pods import SERVICE_ACCOUNT
from raycluster.policy import (
    CLUSTER_LABEL,
    RAY_NODE_LABEL,
    ROLE_LABEL,
    check_fits_quota,
    check_priority_class,
    container_security_context,
    cpu_quantity,
    meta,
    pod_security_context,
)
from raycluster.spec import SpecError
from serve.config import EngineKind, ModelSpec, ServeAppConfig
from serve.engines.vllm_config import derived_gpu_memory_utilization, derived_max_num_seqs
from serve.server_specs import (
    TGI_PORT,
    TRITON_GRPC_PORT,
    TritonServerKind,
    UpstreamServerKind,
    tgi_service,
    triton_service,
)

#: NVIDIA's Triton release 25.12 with its vLLM backend (the tensor interface rayplane's triton
#: engine speaks: text_input, stream, sampling_parameters in; text_output, finish_reason,
#: num_input_tokens, num_output_tokens out). A pinned tag: bump it here and in docs.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-vllm-python-py3"
#: Hugging Face TGI 3.3.6, its last release line (maintenance mode since December 2025).
TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.6"
TRITON_HTTP_PORT = 8000
TRITON_METRICS_PORT = 8002
#: TGI listens here (unprivileged); its Service answers on TGI_PORT (80). /metrics is here too.
TGI_CONTAINER_PORT = 8080
SERVER_ROLE = "inference-server"
INSTANCE_LABEL = "app.kubernetes.io/instance"
#: The RayService whose Serve replicas are the server's clients.
SERVE_APP_LABEL = "rayplane.io/serve-app"
NAME_LABEL = "app.kubernetes.io/name"
WEIGHTS_DIR = "/weights"
MODEL_DIR = f"{WEIGHTS_DIR}/model"
MODEL_REPOSITORY = "/models"
CACHE_DIR = "/cache"
#: Memory-backed /dev/shm: Triton's Python backend (which the vLLM backend is) and vLLM's
#: engine process exchange tensors through shared memory; TGI asks for 1 GB.
SHM_SIZE = "2Gi"
#: Longest wait for a server to load its weights before the kubelet restarts it.
STARTUP_SECONDS = 1200
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
#: The init container: a folder holding config.json, linked where the server reads it.
FETCH = ("import os, sys; from serve.engines.model_source import fetch_model; "
         "path = fetch_model(sys.argv[1], cache_dir=sys.argv[2]); "
         "os.symlink(path, sys.argv[3]); print('model', sys.argv[1], 'in', path)")
_SKIPS = {
    "CKV_K8S_15": "images are pinned by an immutable tag, so IfNotPresent cannot run a stale "
                  "one and spares GPU nodes a multi-GB pull on every start",
    "CKV_K8S_40": "the servers run as uid 1000 like the Ray pods; restricted only requires "
                  "non-root",
    "CKV_K8S_43": "images are pinned by release tag (NGC, GHCR, immutable ECR tags); the "
                  "digest is recorded at mirror time",
}


def server_kind(m: ModelSpec) -> str | None:
    """``triton`` or ``tgi`` for a model whose server rayplane renders, else None."""
    if m.engine is EngineKind.triton and m.triton is not None \
            and m.triton.server is TritonServerKind.container:
        return "triton"
    if m.engine is EngineKind.openai_upstream and m.upstream is not None \
            and m.upstream.server is UpstreamServerKind.tgi:
        return "tgi"
    return None


def tgi_max_batch_total_tokens(pool: Pool, m: ModelSpec, field: str) -> int:
    """Tokens of KV cache TGI may hold on one unit of ``pool``, all sequences together:

        (visible_gb x gpu_memory_utilization - parameters_b x dtype_bytes) x 1e9
        -----------------------------------------------------------------------
          2 x num_hidden_layers x num_key_value_heads x head_dim x dtype_bytes

    the memory the process sees (MIG: its instance's; time-slicing: the whole GPU) times the
    fraction it may take (``derived_gpu_memory_utilization``: 0.9 of a MIG instance, 0.9 /
    replicas of a time-sliced GPU) -- that is, 0.9 of the unit's ``memory_per_unit_gb`` --
    less the weights, over the bytes one token's keys and values take in every layer. TGI's
    ``--cuda-memory-fraction`` (of the memory it sees) is set to the same fraction."""
    shape = m.upstream.model_shape if m.upstream else None
    where = f"{field}.upstream.model_shape"
    if shape is None:
        raise SpecError(f"{where}: required with upstream.server 'tgi': rayplane sizes TGI's "
                        "KV cache (--max-batch-total-tokens) from num_hidden_layers, "
                        "num_key_value_heads, head_dim and parameters_b of the model's "
                        "config.json", field=where)
    fraction = derived_gpu_memory_utilization(pool)
    visible_gb = round(pool.memory_per_unit_gb / pool.gpu_fraction_per_unit, 6)
    usable_gb = visible_gb * fraction
    weights_gb = shape.parameters_b * shape.dtype_bytes
    if weights_gb >= usable_gb:
        raise SpecError(f"{where}.parameters_b: {shape.parameters_b:g}B parameters take "
                        f"{weights_gb:g} GB, more than a unit of pool {pool.name!r} may use "
                        f"({visible_gb:g} GB x {fraction:g} = {usable_gb:g} GB)",
                        field=f"{where}.parameters_b")
    kv_bytes = (2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim
                * shape.dtype_bytes)
    return math.floor((usable_gb - weights_gb) * 1e9 / kv_bytes)


def _check_pool(catalog: Catalog, m: ModelSpec, kind: str, field: str) -> Pool:
    pool = catalog.pool(m.pool, f"{field}.pool")
    if not pool.has_gpu:
        what = "Triton's vLLM backend" if kind == "triton" else "TGI"
        raise SpecError(f"{field}.pool: {pool.name!r} has no GPU and {what} runs on a GPU "
                        "unit; name a GPU pool (a100-mig for production inference)",
                        field=f"{field}.pool")
    return pool


def _check_name(name: str, field: str) -> None:
    if not _DNS_1035.match(name):
        raise SpecError(f"{field}.name: the server's Service would be {name!r}, which is not a "
                        "DNS label (lowercase letters, digits and '-', at most 63, starting "
                        "with a letter); rename the model", field=f"{field}.name")


def triton_repository(m: ModelSpec, pool: Pool) -> dict[str, str]:
    """The Triton model repository of ``m``: ``config.pbtxt`` and ``model.json`` (vLLM's
    engine arguments), as ConfigMap data."""
    assert m.triton is not None
    config = "\n".join([
        f"# Rendered by rayplane for the serve config's model {m.name!r}: Triton's vLLM "
        "backend, decoupled",
        "# (one request, many responses) so the replica can stream tokens.",
        f'name: "{m.triton.model_name}"',
        'backend: "vllm"',
        "model_transaction_policy { decoupled: true }",
        "instance_group [ { count: 1, kind: KIND_MODEL } ]",
        'parameters: { key: "REPORT_CUSTOM_METRICS" value: { string_value: "true" } }',
        ""])
    engine: dict[str, Any] = {
        "model": MODEL_DIR,
        "gpu_memory_utilization": derived_gpu_memory_utilization(pool),
        "max_num_seqs": m.max_num_seqs or derived_max_num_seqs(pool),
        "tensor_parallel_size": 1,
    }
    if m.max_model_len:
        engine["max_model_len"] = m.max_model_len
    return {"config.pbtxt": config, "model.json": json.dumps(engine, indent=2) + "\n"}


def tgi_args(m: ModelSpec, pool: Pool, field: str) -> list[str]:
    """text-generation-launcher's arguments for ``m`` on one unit of ``pool``."""
    total = tgi_max_batch_total_tokens(pool, m, field)
    length = m.max_model_len or 4096
    if length > total:
        raise SpecError(f"{field}.max_model_len: {length} tokens of one sequence do not fit "
                        f"the KV cache a unit of pool {pool.name!r} holds for this model "
                        f"({total} tokens: --max-batch-total-tokens); lower max_model_len or "
                        "use a larger MIG profile", field=f"{field}.max_model_len")
    seqs = m.max_num_seqs or derived_max_num_seqs(pool)
    return ["--model-id", MODEL_DIR, "--hostname", "0.0.0.0",
            "--port", str(TGI_CONTAINER_PORT),
            "--max-input-tokens", str(length - 1), "--max-total-tokens", str(length),
            "--max-batch-prefill-tokens", str(min(total, max(length - 1, 4096))),
            "--max-batch-total-tokens", str(total),
            # Admission: like vllm_config's max_ongoing_requests, twice the batch.
            "--max-concurrent-requests", str(2 * seqs),
            "--cuda-memory-fraction", f"{derived_gpu_memory_utilization(pool):g}",
            "--usage-stats", "off", "--json-output"]


def _fetch_container(env: Environment, m: ModelSpec, tracking_uri: str) -> dict:
    return {
        "name": "fetch-model",
        "image": env.images.image(gpu=False),
        "imagePullPolicy": env.images.pull_policy,
        "command": ["python", "-c", FETCH, m.source, WEIGHTS_DIR, MODEL_DIR],
        "env": [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri},
                {"name": "HOME", "value": "/tmp"},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": {"requests": {"cpu": "1", "memory": "4Gi"},
                      "limits": {"cpu": "1", "memory": "4Gi"}},
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def _probe(path: str, port: str, *, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _server_container(kind: str, m: ModelSpec, pool: Pool, field: str) -> dict:
    # The servers' caches (vLLM's torch.compile and Triton kernels, CUDA's JIT) go under
    # writable emptyDirs, as GPU_CACHE_ENV does for the Ray pods.
    cache_env = {"HOME": f"{CACHE_DIR}/home", "XDG_CACHE_HOME": CACHE_DIR,
                 "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
                 "VLLM_CACHE_ROOT": f"{CACHE_DIR}/vllm",
                 "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/torchinductor",
                 "CUDA_CACHE_PATH": f"{CACHE_DIR}/nv/ComputeCache",
                 "HF_HOME": f"{CACHE_DIR}/huggingface", "HF_HUB_OFFLINE": "1",
                 "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    amounts = {"cpu": cpu_quantity(pool.worker.cpus), "memory": f"{pool.worker.memory_gib}Gi",
               pool.kubernetes_resource: "1"}
    mounts = [{"name": "weights", "mountPath": WEIGHTS_DIR},
              {"name": "tmp", "mountPath": "/tmp"},
              {"name": "cache", "mountPath": CACHE_DIR},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    if kind == "triton":
        assert m.triton is not None
        container = {
            "name": "triton", "image": TRITON_IMAGE,
            "command": ["tritonserver"],
            "args": [f"--model-repository={MODEL_REPOSITORY}", "--model-control-mode=none",
                     f"--http-port={TRITON_HTTP_PORT}", f"--grpc-port={TRITON_GRPC_PORT}",
                     f"--metrics-port={TRITON_METRICS_PORT}", "--allow-metrics=true",
                     "--allow-gpu-metrics=true", "--strict-readiness=true",
                     "--exit-on-error=true"],
            "ports": [{"name": "http", "containerPort": TRITON_HTTP_PORT, "protocol": "TCP"},
                      {"name": "grpc", "containerPort": TRITON_GRPC_PORT, "protocol": "TCP"},
                      {"name": "metrics", "containerPort": TRITON_METRICS_PORT,
                       "protocol": "TCP"}],
            "startupProbe": _probe("/v2/health/ready", "http", period=10,
                                   failures=STARTUP_SECONDS // 10),
            "readinessProbe": _probe("/v2/health/ready", "http", period=10, failures=3),
            "livenessProbe": _probe("/v2/health/live", "http", period=30, failures=3),
        }
        mounts.append({"name": "repository", "mountPath": MODEL_REPOSITORY, "readOnly": True})
    else:
        container = {
            "name": "tgi", "image": TGI_IMAGE,
            "args": tgi_args(m, pool, field),
            "ports": [{"name": "http", "containerPort": TGI_CONTAINER_PORT, "protocol": "TCP"}],
            "startupProbe": _probe("/health", "http", period=10,
                                   failures=STARTUP_SECONDS // 10),
            "readinessProbe": _probe("/health", "http", period=10, failures=3),
            "livenessProbe": _probe("/health", "http", period=30, failures=3),
        }
        # TGI's hub cache and converted weights; the launcher's sockets under /tmp.
        cache_env["HF_HOME"] = "/data"
        cache_env["HUGGINGFACE_HUB_CACHE"] = "/data"
        mounts.append({"name": "data", "mountPath": "/data"})
    container.update({
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": k, "value": v} for k, v in cache_env.items()],
        # Requests equal limits (Guaranteed QoS): a Ray worker's share of the pool's node.
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    })
    return container


def _labels(kind: str, name: str, pool: Pool, cluster: str) -> dict[str, str]:
    # Not CLUSTER_LABEL: what selects a Ray cluster's pods (PDBs, policies) must not match.
    return {NAME_LABEL: kind, INSTANCE_LABEL: name, ROLE_LABEL: SERVER_ROLE,
            "rayplane.io/pool": pool.name, SERVE_APP_LABEL: cluster}


def render_server(catalog: Catalog, env: Environment, svc: RayServiceSpec, serve_cfg: ServeAppConfig,
                  m: ModelSpec, *, cluster: str, field: str) -> list[dict]:
    """The objects of one model's server: [ConfigMap (Triton),] Deployment, Service,
    ServiceMonitor, NetworkPolicies."""
    kind = server_kind(m)
    assert kind is not None
    pool = _check_pool(catalog, m, kind, field)
    name = (triton_service if kind == "triton" else tgi_service)(m.deployment_name)
    _check_name(name, field)
    ns = svc.namespace
    priority = svc.priority_class or pool.priority_class
    check_priority_class(catalog, priority, f"{field}.pool", namespace=ns)
    check_fits_quota(catalog, ns, cpus=pool.worker.cpus, memory_gib=pool.worker.memory_gib,
                     gpu_units=1, field=f"{field}.pool", what=f"the {kind} server pod",
                     resource=pool.kubernetes_resource)
    labels = _labels(kind, name, pool, cluster)
    selector = {INSTANCE_LABEL: name}
    skips = {f"checkov.io/skip{i}": f"{check}={reason}"
             for i, (check, reason) in enumerate(sorted(_SKIPS.items()), start=1)}
    volumes: list[dict] = [
        {"name": "weights", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}]
    out: list[dict] = []
    if kind == "triton":
        assert m.triton is not None
        model = m.triton.model_name
        repo = f"{name}-repository"
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(repo, ns, labels),
                    "data": triton_repository(m, pool)})
        volumes.append({"name": "repository", "configMap": {
            "name": repo, "defaultMode": 0o444,
            "items": [{"key": "config.pbtxt", "path": f"{model}/config.pbtxt"},
                      {"key": "model.json", "path": f"{model}/1/model.json"}]}})
        serving = [{"name": "grpc", "port": TRITON_GRPC_PORT, "targetPort": "grpc"},
                   {"name": "http", "port": TRITON_HTTP_PORT, "targetPort": "http"},
                   {"name": "metrics", "port": TRITON_METRICS_PORT, "targetPort": "metrics"}]
        client_ports, metrics_port, metrics_name = [TRITON_GRPC_PORT], TRITON_METRICS_PORT, \
            "metrics"
    else:
        volumes.append({"name": "data", "emptyDir": {}})
        serving = [{"name": "http", "port": TGI_PORT, "targetPort": "http"}]
        client_ports, metrics_port, metrics_name = [TGI_CONTAINER_PORT], TGI_CONTAINER_PORT, \
            "http"
    pod_spec: dict[str, Any] = {
        # The init container reads S3 (and MLflow's S3 artifacts) through IRSA, like Ray pods.
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "priorityClassName": priority,
        "nodeSelector": dict(pool.node_selector),
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": 60,
        "initContainers": [_fetch_container(
            env, m, serve_cfg.mlflow_tracking_uri or env.mlflow_tracking_uri)],
        "containers": [_server_container(kind, m, pool, field)],
        "volumes": volumes,
    }
    tolerations = [t.toleration() for t in pool.taints]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    out.append({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(name, ns, labels, annotations=dict(skips)),
        "spec": {
            # The GPU server does not follow the Serve replicas' autoscaling: min_replicas
            # pods, each one GPU unit, always up (the replicas in front are cheap proxies).
            "replicas": max(1, m.autoscaling.min_replicas),
            "selector": {"matchLabels": dict(selector)},
            # A new pod loads its weights before the old one goes (one extra unit while it
            # does: the namespace's GPU quota leaves room for it).
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": dict(labels), "annotations": {
                "kubectl.kubernetes.io/default-container": kind, **skips}},
                "spec": pod_spec},
        },
    })
    out.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(name, ns, labels),
                "spec": {"type": "ClusterIP", "selector": dict(selector),
                         "ports": [{**p, "protocol": "TCP"} for p in serving]}})
    out.append({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": meta(name, ns, labels),
        "spec": {"selector": {"matchLabels": dict(selector)},
                 "endpoints": [{"port": metrics_name, "path": "/metrics", "interval": "15s",
                                "relabelings": [
                                    {"action": "replace", "targetLabel": "pool",
                                     "replacement": pool.name},
                                    {"action": "replace", "targetLabel": "model",
                                     "replacement": m.name}]}]}})
    serve_pods = {"matchLabels": {RAY_NODE_LABEL: "true", CLUSTER_LABEL: cluster}}
    tcp = [{"protocol": "TCP", "port": p} for p in client_ports]
    out.append(_policy(f"allow-{name}", ns, labels, {"matchLabels": dict(selector)}, ingress=[
        # The Serve pods of the RayService: the model's only clients.
        {"from": [{"podSelector": serve_pods}], "ports": tcp},
        {"from": [_namespace("monitoring")],
         "ports": [{"protocol": "TCP", "port": metrics_port}]}]))
    out.append(_policy(f"allow-{cluster}-to-{name}", ns, labels, serve_pods, egress=[
        {"to": [{"podSelector": {"matchLabels": dict(selector)}}], "ports": tcp}]))
    return out


def _namespace(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def _policy(name: str, ns: str, labels: dict | None, pods: dict, *,
            ingress: list | None = None, egress: list | None = None) -> dict:
    spec: dict[str, Any] = {"podSelector": pods}
    if ingress is not None:
        spec.update(ingress=ingress, policyTypes=["Ingress"])
    else:
        spec.update(egress=egress, policyTypes=["Egress"])
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(name, ns, labels), "spec": spec}


def render_inference_servers(catalog: Catalog, env: Environment, svc: RayServiceSpec,
                             serve_cfg: ServeAppConfig, *, cluster: str,
                             field: str) -> list[dict]:
    """Every server a RayService's serve config asks rayplane to run (none for most)."""
    out: list[dict] = []
    cfield = f"{field}.config({svc.config})"
    for j, m in enumerate(serve_cfg.models):
        if server_kind(m) is not None:
            out.extend(render_server(catalog, env, svc, serve_cfg, m, cluster=cluster,
                                     field=f"{cfield}.models[{j}]"))
    return out


def render_scrape_policy(servers: list[dict]) -> list[dict]:
    """Prometheus (namespace monitoring) may reach Triton's metrics port, which its own
    egress policy does not list (TGI's /metrics is on 8080, which it does)."""
    namespaces = sorted({o["metadata"]["namespace"] for o in servers
                         if o["kind"] == "Deployment"
                         and o["metadata"]["labels"].get(NAME_LABEL) == "triton"})
    if not namespaces:
        return []
    triton = {"podSelector": {"matchLabels": {NAME_LABEL: "triton", ROLE_LABEL: SERVER_ROLE}}}
    return [_policy("allow-triton-metrics-scrape", "monitoring", None, {}, egress=[{
        "to": [{**_namespace(ns), **triton} for ns in namespaces],
        "ports": [{"protocol": "TCP", "port": TRITON_METRICS_PORT}]}])]


__all__ = ["SERVER_ROLE", "TGI_CONTAINER_PORT", "TGI_IMAGE",
           "TRITON_HTTP_PORT", "TRITON_IMAGE", "TRITON_METRICS_PORT", "render_inference_servers",
           "render_scrape_policy", "render_server", "server_kind", "tgi_args",
           "tgi_max_batch_total_tokens", "triton_repository"]
