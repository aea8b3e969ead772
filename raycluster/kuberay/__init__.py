"""KubeRay custom resources (``ray.io/v1``, KubeRay 1.7) rendered from the catalog: RayCluster,
RayJob (a training config), RayService (a serve config) and RayCronJob, and what serving them
in production takes (``serving``: Redis TLS, upgrades through a Gateway, the TLS load balancer).

Every worker group is a pool of the catalog: its node selector, tolerations, GPU resource name
(``nvidia.com/gpu`` or ``nvidia.com/mig-3g.40gb``), ``num-gpus`` and the pool's custom resource
``pool:<name>`` -- the same resource the local cluster's node for that pool advertises, so the
same job and the same Serve config schedule the same way on a laptop and on EKS. Pods meet the
``restricted`` Pod Security Standard, Ray token auth is on (``authOptions``), and input that
could never run is refused here, before anything reaches a cluster, with the field named.

Pure functions: specs in, dicts out. Only ``raycluster.render.apply_objects`` talks to Kubernetes.

Modules: ``sizing`` (what a worker group's pods ask and how many: from a worker group spec, a
training config or a serve config), ``pods`` (containers, volumes, the head and worker group
specs, the submitter pod, Secrets as env variables or files), ``objects`` (the RayCluster,
RayJob, RayCronJob and RayService objects), ``agents`` (the agents app's RayService) and
``serving`` (Redis TLS on the heads, upgrade strategies, Gateways and TLS load balancers) and
``features`` (the Feast feature store: its yaml, login, materialisation and the TF job) and
``inference_servers`` (the Triton and TGI servers a serve config asks for, beside its RayService).
"""

from raycluster.kuberay.agents import (
    AGENTS_DB_SECRET,
    AGENTS_DB_SECRET_KEY,
    MODEL_KEY_SECRET,
    MODEL_KEY_SECRET_KEY,
    agents_groups,
    render_agents_service,
)
from raycluster.kuberay.features import render_feature_store
from raycluster.kuberay.inference_servers import render_inference_servers, render_scrape_policy
from raycluster.kuberay.objects import (
    API_VERSION,
    entrypoint_for,
    ray_cluster_spec,
    render_raycluster,
    render_raycronjob,
    render_rayjob,
    render_rayservice,
    serve_config_yaml,
)
from raycluster.kuberay.pods import (
    API_KEYS_SECRET,
    API_KEYS_SECRET_KEY,
    AUTH_SECRET,
    AUTH_SECRET_KEY,
    REDIS_SECRET,
    SERVICE_ACCOUNT,
    SHARED_CLAIM,
)
from raycluster.kuberay.serving import render_serving
from raycluster.kuberay.sizing import (
    GroupShape,
    check_worker_fits_pool,
    resolve_group,
    serve_groups,
    training_group,
)

__all__ = [
    "AGENTS_DB_SECRET",
    "AGENTS_DB_SECRET_KEY",
    "API_KEYS_SECRET",
    "API_KEYS_SECRET_KEY",
    "API_VERSION",
    "AUTH_SECRET",
    "AUTH_SECRET_KEY",
    "REDIS_SECRET",
    "SERVICE_ACCOUNT",
    "SHARED_CLAIM",
    "MODEL_KEY_SECRET",
    "MODEL_KEY_SECRET_KEY",
    "GroupShape",
    "agents_groups",
    "check_worker_fits_pool",
    "entrypoint_for",
    "ray_cluster_spec",
    "render_agents_service",
    "render_feature_store",
    "render_inference_servers",
    "render_raycluster",
    "render_raycronjob",
    "render_rayjob",
    "render_rayservice",
    "render_scrape_policy",
    "render_serving",
    "resolve_group",
    "serve_config_yaml",
    "serve_groups",
    "training_group",
]
